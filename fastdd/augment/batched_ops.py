"""DSA ops with per-sample parameters (leading dim n), vectorised over the batch; all differentiable in x."""
import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(x.dtype).view(-1, 1, 1, 1)


def color(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor,
          contrast: torch.Tensor) -> torch.Tensor:
    """Brightness, saturation, contrast in sequence, folded into one full-size pass: x * (s*k) + offset.

    With b, s, k the three parameters and m_c the per-pixel channel mean of x: brightness then
    saturation give (x - m_c) * s + m_c + b, whose image mean is m = mean_hw(m_c) + b; contrast then
    maps it to x * (s*k) + m_c * (k * (1 - s)) + (b - m) * k + m.
    """
    b, s, k = (_per_sample(v, x) for v in (brightness, saturation, contrast))
    pixel_mean = x.mean(dim=1, keepdim=True)
    image_mean = pixel_mean.mean(dim=(2, 3), keepdim=True) + b
    offset = torch.addcmul((b - image_mean) * k + image_mean, pixel_mean, k * (1 - s))
    return torch.addcmul(offset, x, s * k)


def crop(x: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Translate by integer pixels, zero fill (the reference's 1-px zero pad plus index clamp)."""
    n, channels, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(height, device=x.device) + translation[:, :1] + 1).clamp_(0, height + 1)
    cols = (torch.arange(width, device=x.device) + translation[:, 1:] + 1).clamp_(0, width + 1)
    flat_index = (rows[:, :, None] * (width + 2) + cols[:, None, :]).view(n, 1, height * width)
    picked = padded.flatten(2).gather(2, flat_index.expand(n, channels, height * width))
    return picked.view(n, channels, height, width)


def cutout_keep_mask(offset: torch.Tensor, size: tuple[int, int], image_size: tuple[int, int],
                     dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, H, W]: 0 inside the square [offset - size//2, offset - size//2 + size), 1 elsewhere."""
    inside = []
    for axis in range(2):
        low = offset[:, axis:axis + 1] - size[axis] // 2
        coord = torch.arange(image_size[axis], device=offset.device)
        inside.append((coord >= low) & (coord < low + size[axis]))
    cut = inside[0][:, :, None] & inside[1][:, None, :]
    return (~cut).unsqueeze(1).to(dtype)


def cutout(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x * cutout_keep_mask(offset, size, tuple(x.shape[2:]), x.dtype)


def flip(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Exact mirror along W by a column gather (a resampling grid would add rounding)."""
    width = x.shape[3]
    cols = torch.arange(width, device=x.device)
    source_cols = torch.where(flag.view(-1, 1), width - 1 - cols, cols)
    return x.gather(3, source_cols.view(-1, 1, 1, width).expand(x.shape))


def scale_theta(scale: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(scale[:, 0])
    return torch.stack([torch.stack([scale[:, 0], zero, zero], 1),
                        torch.stack([zero, scale[:, 1], zero], 1)], 1)


def rotate_theta(angle: torch.Tensor) -> torch.Tensor:
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def _base_coords(steps: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1], computed as affine_grid does for align_corners=False."""
    return torch.linspace(-1, 1, steps, dtype=like.dtype, device=like.device) * (steps - 1) / steps


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, size, align_corners=False) without its [n, H*W, 3] base-grid bmm."""
    n = theta.shape[0]
    xs, ys = _base_coords(width, theta), _base_coords(height, theta)
    grid = theta.new_empty(n, height, width, 2)
    for axis in range(2):
        along_x = theta[:, axis, 0, None] * xs  # [n, W]
        along_y = torch.addcmul(theta[:, axis, 2, None], theta[:, axis, 1, None], ys)  # [n, H]
        torch.add(along_x[:, None, :], along_y[:, :, None], out=grid[..., axis])
    return grid


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Reference sampling: bilinear grid_sample, zero padding, align_corners=False (torch default)."""
    compute_dtype = affine_param_dtype(x)
    grid = affine_grid(theta.to(compute_dtype), x.shape[2], x.shape[3])
    out = F.grid_sample(x.to(compute_dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


def affine_param_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
