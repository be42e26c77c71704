"""The synthetic set (learnable normalised images, class-major), its segment views and image-step arithmetic."""
from dataclasses import dataclass

import torch

from fastdd.data import ClassSampler, ImageDataset


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float [C*ipc, ch, H, W], requires_grad, normalised like the dataset
    labels: torch.Tensor  # int64 [C*ipc], class-major
    num_classes: int
    ipc: int

    @classmethod
    def initialise(cls, train: ImageDataset, ipc: int, init: str, generator: torch.Generator,
                   device: torch.device) -> "SyntheticSet":
        C = train.num_classes
        labels = torch.arange(C).repeat_interleave(ipc)
        if init == "real":
            idx = ClassSampler(train.labels, C).take(ipc, generator=generator).reshape(-1)
            images = train.normalize(train.images[idx], device=device)
        else:
            shape = (C * ipc, train.channels, *train.image_size)
            images = torch.randn(shape, generator=generator).to(device)
        return cls(images.detach().clone().requires_grad_(True), labels.to(device), C, ipc)

    @property
    def seg(self) -> torch.Tensor:
        return self.labels

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def detached(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.detach().cpu().clone(), self.labels.cpu().clone()


class SyntheticRows:
    """Rows `rows` of a SyntheticSet (a DASM segment), `ipc` of them per class; `images` is re-read from
    the parent on every access, so it is differentiable into the parent's leaf and never stale."""

    def __init__(self, parent: SyntheticSet, rows: torch.Tensor, ipc: int):
        self.parent, self.rows, self.ipc, self.num_classes = parent, rows, ipc, parent.num_classes

    @property
    def images(self) -> torch.Tensor:
        return self.parent.images[self.rows]

    @property
    def labels(self) -> torch.Tensor:
        return self.parent.labels[self.rows]

    seg = labels

    @property
    def shape(self) -> torch.Size:
        """The shape of `images`, without gathering them."""
        return torch.Size((self.rows.shape[0], *self.parent.images.shape[1:]))

    def detached(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.detach().cpu().clone(), self.labels.cpu().clone()


def plain_sgd_group(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(lr, momentum) of an SGD whose update the closed forms below reproduce; anything else is refused."""
    group = optimizer.param_groups[0]
    if (not isinstance(optimizer, torch.optim.SGD) or group.get("dampening", 0) or group.get("nesterov")
            or group.get("weight_decay", 0) or group.get("maximize")):
        raise ValueError("sequential class steps need plain SGD (momentum only: no dampening, nesterov, "
                         "weight decay or maximize)")
    return float(group["lr"]), float(group["momentum"])


def lookahead_coefficients(num_classes: int, momentum: float) -> list[float]:
    """Class c's rows are read after the c earlier class steps, each of which moves them by lr·m^j·buf:
    coefficient c = m + m² + … + m^c (summed in step order)."""
    out, total, power = [], 0.0, 1.0
    for _ in range(num_classes):
        out.append(total)
        power *= momentum
        total += power
    return out


def sequential_class_update(images: torch.Tensor, buf: torch.Tensor | None, grad: torch.Tensor,
                            row_class: torch.Tensor, num_classes: int, lr: float, momentum: float):
    """C sequential SGD-momentum steps (step c carries only class c's rows of `grad`) in one update.

    A row of class c decays its buffer for the c steps before its own, adds its gradient at step c and
    decays for the C−1−c steps after: buf' = m^C·buf + m^(C−1−c)·g, and the row moves by
    lr·[(m + … + m^C)·buf + (1 + m + … + m^(C−1−c))·g]. Returns the new buffer (None when momentum is 0,
    as torch's SGD keeps none). `images` is updated in place."""
    C, m = num_classes, momentum
    tail = torch.tensor([sum(m ** j for j in range(C - c)) for c in range(C)], dtype=grad.dtype)
    decay = torch.tensor([m ** (C - 1 - c) for c in range(C)], dtype=grad.dtype)
    shape = (-1,) + (1,) * (grad.dim() - 1)
    index = row_class.to(tail.device)
    tail, decay = tail[index].view(shape).to(grad.device), decay[index].view(shape).to(grad.device)
    with torch.no_grad():
        if buf is None or m == 0:
            images.sub_(lr * tail * grad)
            return None if m == 0 else decay * grad
        images.sub_(lr * (sum(m ** j for j in range(1, C + 1)) * buf + tail * grad))
        return m ** C * buf + decay * grad


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view((1, -1) + (1,) * (like.dim() - 2))


def pixel_step_scale(std, like: torch.Tensor) -> torch.Tensor:
    """z = (x − mean)/std: a step of lr·∂L/∂x in pixels is a step of lr·∂L/∂z / std² in z (momentum is
    linear, so scaling every gradient keeps SGD-momentum exactly IDC's pixel-space optimiser)."""
    return 1.0 / _channel_view(std, like).square()


def clamp_to_pixels(images: torch.Tensor, mean, std) -> None:
    """In place: normalised images clamped to the normalised values of pixels 0 and 1, per channel."""
    mean, std = _channel_view(mean, images), _channel_view(std, images)
    with torch.no_grad():
        images.copy_(torch.maximum(torch.minimum(images, (1 - mean) / std), (0 - mean) / std))
