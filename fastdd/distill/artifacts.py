"""Run-directory artifacts: atomic file writes, synthetic.pt, grid.png, loss.png, metrics.json."""
import json
import math
import os
import tempfile

import torch
from PIL import Image, ImageDraw

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


def save_loss_plot(path: str, losses: list[float], width: int = 640, height: int = 360) -> None:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    pad = 40
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
    values = [math.log10(v) for v in losses if v > 0 and math.isfinite(v)]
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        pts = [(pad + i * (width - 1.5 * pad) / (len(values) - 1),
                height - pad - (v - lo) / span * (height - 1.5 * pad)) for i, v in enumerate(values)]
        draw.line(pts, fill=(31, 119, 180), width=2)
        draw.text((pad + 4, pad // 2 + 4), f"loss (log10) max {10 ** hi:.4g}", fill="black")
        draw.text((pad + 4, height - pad - 14), f"min {10 ** lo:.4g}", fill="black")
    draw.text((width // 2 - 30, height - pad + 10), f"iteration (0..{len(losses)})", fill="black")
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
