"""Registry of distillation methods (engine plug-ins)."""
from fastdd.distill.methods.base import Method, MethodOutput
from fastdd.distill.methods.dm import DM

METHODS: dict[str, type[Method]] = {"dm": DM}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, args: dict | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](args)


__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "register_method"]
