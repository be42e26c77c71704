"""Registry of distillation methods (engine plug-ins)."""
from fastdd.distill.methods.base import Method, MethodOutput
from fastdd.distill.methods.dm import DM
from fastdd.distill.methods.gm import GM
from fastdd.distill.methods.dasm import DASM
from fastdd.distill.methods.sgs import SGS
from fastdd.distill.methods.robust import Robust

METHODS: dict[str, type[Method]] = {"dm": DM, "gm": GM, "dasm": DASM, "sgs": SGS, "robust": Robust}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, args: dict | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](args)


__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "register_method"]
