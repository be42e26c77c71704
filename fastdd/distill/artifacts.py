"""Run-directory artifacts: atomic file writes, synthetic.pt, grid.png, loss.png (matplotlib), metrics.json."""
import json
import math
import os
import tempfile

import torch
import numpy as np
from PIL import Image

import fastdd


def atomic_write(path: str, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temps(folder: str) -> None:
    """Temp files left by a process killed mid-write (the real files they would replace are intact)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))


def save_torch(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def dataset_meta(train) -> dict:
    return {"name": train.name, "num_classes": train.num_classes, "mean": list(train.mean),
            "std": list(train.std), "class_names": list(train.class_names), "channels": train.channels,
            "image_size": list(train.image_size)}


def save_synthetic(path: str, images, labels, train, config: dict, extra: dict | None = None) -> None:
    save_torch({"images": images.detach().cpu(), "labels": labels.cpu(), "dataset": dataset_meta(train),
                "config": config, "fastdd_version": fastdd.__version__, **(extra or {})}, path)


def save_grid(path: str, images, labels, mean, std, max_per_class: int = 20) -> None:
    """De-normalised images, one row per class."""
    x = images.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = labels.unique().tolist()
    per_class = min(max_per_class, max(int((labels == c).sum()) for c in classes))
    C, H, W = x.shape[1:]
    scale = max(1, 32 // max(H, W))
    canvas = torch.full((C, len(classes) * (H + 1), per_class * (W + 1)), 255, dtype=torch.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(x[labels.cpu() == c][:per_class]):
            canvas[:, row * (H + 1): row * (H + 1) + H, col * (W + 1): col * (W + 1) + W] = img
    arr = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[:, :, 0] if C == 1 else arr, "L" if C == 1 else "RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def ema(values, alpha: float | None = None) -> np.ndarray:
    """Exponential moving average of the finite values (NaN/inf entries hold the previous average).
    alpha defaults to 2 / (span + 1) with span = max(1, n // 20)."""
    values = np.asarray(values, dtype=np.float64)
    if alpha is None:
        alpha = 2.0 / (max(1, len(values) // 20) + 1)
    out = np.empty_like(values)
    average = math.nan
    for i, value in enumerate(values):
        if math.isfinite(value):
            average = value if math.isnan(average) else alpha * value + (1 - alpha) * average
        out[i] = average
    return out


def _accuracy_series(evaluations) -> dict:
    """{model: (iterations, means, stds)} from evaluation entries."""
    series: dict = {}
    for entry in evaluations or ():
        for model, result in entry.items():
            if isinstance(result, dict) and "mean" in result:
                its, means, stds = series.setdefault(model, ([], [], []))
                its.append(entry.get("iteration", 0))
                means.append(100 * float(result["mean"]))
                stds.append(100 * float(result.get("std", 0.0)))
    return series


def save_curves(path: str, history: dict) -> dict:
    """loss.png: raw loss (light) with its EMA over it (log-y when positive across decades) and, in a second
    panel, evaluation accuracy with markers at the evaluated iterations. Returns the plotted series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg on this figure only: no global backend
    from matplotlib.figure import Figure

    losses = np.asarray(history.get("loss", []), dtype=np.float64)
    iterations = np.arange(1, len(losses) + 1)
    smoothed = ema(losses)
    accuracy = _accuracy_series(history.get("evaluations"))
    fig = Figure(figsize=(8, 6 if accuracy else 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if accuracy else 1, 1, sharex=True, squeeze=False)[:, 0]
    loss_ax = axes[0]
    loss_ax.plot(iterations, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    loss_ax.plot(iterations, smoothed, color="tab:blue", linewidth=2, label="loss (EMA)")
    finite = losses[np.isfinite(losses)]
    log_y = bool(len(finite) and finite.min() > 0 and finite.max() / finite.min() >= 10)
    if log_y:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("distillation loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(loc="upper right")
    if accuracy:
        acc_ax = axes[1]
        for model, (its, means, stds) in accuracy.items():
            acc_ax.errorbar(its, means, yerr=stds, marker="o", capsize=3, label=model)
        acc_ax.set_ylabel("test accuracy (%)")
        acc_ax.set_title("evaluation")
        acc_ax.grid(True, alpha=0.3)
        acc_ax.legend(loc="lower right")
    axes[-1].set_xlabel("iteration")
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return {"iterations": iterations, "loss": losses, "loss_ema": smoothed, "log_y": log_y,
            "accuracy": {m: {"iterations": its, "mean": means, "std": stds}
                         for m, (its, means, stds) in accuracy.items()}}


def save_loss_plot(path: str, losses: list[float]) -> dict:
    """Loss curve only (kept for callers without evaluations); see save_curves."""
    return save_curves(path, {"loss": list(losses), "evaluations": []})


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
