"""The method plug-in interface: a method turns the engine's batch into a loss and/or an image gradient."""
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class MethodOutput:
    loss: torch.Tensor | None = None   # the engine backpropagates it into the synthetic images
    grad: torch.Tensor | None = None   # an extra gradient added to the images' (SGS-style surgery)
    value: float | None = None         # logged loss when `loss` is None
    logs: dict = field(default_factory=dict)


class Method:
    """Subclasses set `name`, optionally `Args` (a dataclass of method keys), and implement `compute`."""

    name = "base"
    Args = None
    default_lr = 1.0

    def __init__(self, args: dict | None = None):
        self.args = parse_method_args(self.name, self.Args, args or {})

    def lr_for(self, ipc: int) -> float:
        return self.default_lr

    def prepare(self, engine) -> None:
        """Called once before the first iteration (and after a resume)."""

    def compute(self, engine, iteration: int) -> MethodOutput:
        raise NotImplementedError

    def iteration(self, engine, iteration: int) -> dict:
        """One outer iteration: by default one loss/gradient and one image step."""
        out = self.compute(engine, iteration)
        value = engine.image_step(out.loss, out.grad)
        return {"loss": out.value if out.value is not None else value, **out.logs}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def parse_method_args(method: str, args_cls, values: dict):
    if args_cls is None:
        if values:
            raise ValueError(f"unknown config key(s) {sorted(values)} for method {method!r}; "
                             f"it takes no method-specific keys")
        return None
    valid = {f.name for f in dataclasses.fields(args_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for method {method!r}; valid method keys: "
                         f"{', '.join(sorted(valid))}")
    return args_cls(**values)
