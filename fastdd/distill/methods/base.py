"""The method plug-in interface: hooks the engine's one loop calls, each turning a batch into an image update."""
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class MethodOutput:
    loss: torch.Tensor | None = None   # the engine backpropagates it into the synthetic images
    grad: torch.Tensor | None = None   # an extra gradient added to the images' (SGS-style surgery)
    value: float | torch.Tensor | None = None  # logged loss when `loss` is None (a tensor: no host read)
    sequential_by_class: bool = False  # `grad` holds per-class gradients for IDC's C sequential class steps
    backpropagated: bool = False       # the method backpropagated `loss` itself (class chunk by class chunk):
    #                                    `grad` is its whole image gradient, `loss` (detached) is only logged
    logs: dict = field(default_factory=dict)


class Method:
    """Subclasses set `name`, optionally `Args` (a dataclass of method keys), and implement `compute`
    (one image update per outer iteration) or the inner-loop hooks. The engine's run_iteration calls:
    begin_iteration → inner_steps × (compute_inner → image step → after_step) → end_iteration."""

    name = "base"
    Args = None

    # A method that wraps another (sgs, robust, dasm keep it in `self.base`) inherits these two from it.
    @property
    def pixel_space(self) -> bool:
        """True: image steps in pixel units and a clamp to [0, 1] (engine.run_iteration)."""
        return bool(getattr(getattr(self, "base", None), "pixel_space", False))

    @property
    def channels_last_cpu(self) -> bool:
        """channels_last=auto on the CPU: on for steps dominated by no-grad real forwards (dm 1.36x faster), off
        for network training + double backward (gm 0.84x); benchmarks/results/cpu_defaults.json."""
        return bool(getattr(getattr(self, "base", None), "channels_last_cpu", False))

    def __init__(self, args: dict | None = None):
        self.args = parse_method_args(self.name, self.Args, args or {})

    def lr_for(self, ipc: int) -> float:
        return 1.0

    def prepare(self, engine) -> None:
        """Called once before the first iteration (and after a resume)."""

    def compute(self, engine, iteration: int) -> MethodOutput:
        raise NotImplementedError

    def begin_iteration(self, engine, iteration: int):
        """Per-iteration state handed to the other hooks (e.g. a trainable network)."""
        return None

    def inner_steps(self, engine) -> int:
        return 1

    def compute_inner(self, engine, iteration: int, state, inner: int) -> MethodOutput:
        return self.compute(engine, iteration)

    def after_step(self, engine, iteration: int, state, inner: int) -> None:
        """Called after each image step (e.g. train the network on real data)."""

    def end_iteration(self, engine, iteration: int, state) -> dict:
        """Extra logs of the iteration."""
        return {}

    def iteration(self, engine, iteration: int) -> dict:
        """One outer iteration through the engine's loop (for callers that step a method directly)."""
        return engine.run_iteration(iteration, self)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def on_host(index: torch.Tensor) -> torch.Tensor:
    """`index` on the CPU; host-side indices (the samplers draw there) are used as they are."""
    return index if index.device.type == "cpu" else index.cpu()


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
