"""DASM difficulty: a scorer trained on earlier segments, per-sample CE losses, per-class easy-drop windows."""
import math

import torch
import torch.nn.functional as F

from fastdd.evaluate.protocol import derive_seeds, predict, resolve_augmentation, train_model
from fastdd.models import get_model


def p_schedule(segments: int, p_max: float = 0.5, p: list | None = None) -> list[float]:
    """Fraction of easiest samples dropped per class for each segment: `p` as given (p[0] must be 0:
    segment 1 has nothing to score with), else the linear p_k = (k−1)/K · p_max, k = 1..K."""
    if p is None:
        if not 0 <= p_max < 1:
            raise ValueError(f"dasm: config key 'p_max' must lie in [0, 1), got {p_max!r}")
        return [k / segments * p_max for k in range(segments)]
    if not isinstance(p, (list, tuple)) or len(p) != segments:
        raise ValueError(f"dasm: config key 'p' must be a list of {segments} fractions (one per segment), got {p!r}")
    for i, value in enumerate(p):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"dasm: config key 'p' entry p[{i}]={value!r} must lie in [0, 1)")
    if p[0] != 0:
        raise ValueError(f"dasm: config key 'p' must start with 0 (segment 1 has no earlier segments to "
                         f"score difficulty with), got p[0]={p[0]!r}")
    return [float(v) for v in p]


def train_scorer(images: torch.Tensor, labels: torch.Tensor, num_classes: int, model: str, epochs: int,
                 seed: int, device, augment: str | None = "dsa", batch_size: int = 256, lr: float = 0.01):
    """A fresh `model` trained on (images, labels) with the evaluation protocol's schedule
    (fastdd.evaluate: SGD momentum 0.9, wd 5e-4, lr ×0.1 at half), seeded like train_and_evaluate."""
    init_seed, shuffle_seed, augment_seed = derive_seeds(seed, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = get_model(model, images.shape[1], num_classes, tuple(images.shape[2:]))
    net = net.to(device)
    train_model(net, images.detach().to(device, torch.float32), labels.to(device, torch.long), epochs, batch_size, lr,
                torch.Generator().manual_seed(shuffle_seed), resolve_augmentation(augment),
                torch.Generator().manual_seed(augment_seed))
    return net.eval()


@torch.no_grad()
def score_samples(model, dataset, device=None, batch_size: int = 2048) -> torch.Tensor:
    """CE loss of every sample of `dataset` under `model` (eval mode, batched inference) -> float [N] on CPU."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels = torch.as_tensor(dataset.labels)
    out = []
    for start in range(0, len(labels), batch_size):
        x = dataset.normalize(dataset.images[start:start + batch_size], device=device)
        y = labels[start:start + batch_size].to(device)
        out.append(F.cross_entropy(model(x), y, reduction="none").float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model, dataset, device=None) -> float:
    predictions = predict(model, dataset, device=device)
    return float((predictions == torch.as_tensor(dataset.labels).cpu()).float().mean())


def difficulty_window(losses: torch.Tensor, labels: torch.Tensor, num_classes: int, p: float):
    """Per class, rank samples by loss (ties: lower index first) and drop the floor(p·n_c) easiest.
    Returns (kept indices, ascending, int64; info dict with per-class counts and loss thresholds)."""
    if not 0 <= p < 1:
        raise ValueError(f"dasm: drop fraction p must lie in [0, 1), got {p!r}")
    labels = torch.as_tensor(labels).long().cpu()
    losses = losses.float().cpu()
    kept, info = [], {"p": float(p), "kept_per_class": [], "dropped_per_class": [], "loss_threshold": [],
                      "mean_loss_kept": [], "mean_loss_all": []}
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        order = torch.sort(losses[members], stable=True).indices
        drop = math.floor(p * len(members) + 1e-9)
        keep = members[order[drop:]]
        kept.append(keep)
        info["kept_per_class"].append(len(keep))
        info["dropped_per_class"].append(drop)
        info["loss_threshold"].append(float(losses[keep].min()) if len(keep) else None)
        info["mean_loss_kept"].append(float(losses[keep].mean()) if len(keep) else None)
        info["mean_loss_all"].append(float(losses[members].mean()) if len(members) else None)
    info["kept"], info["dropped"] = sum(info["kept_per_class"]), sum(info["dropped_per_class"])
    return torch.sort(torch.cat(kept)).values, info
