"""IDC multi-formation: each stored image holds f×f patches, decoded by bilinear upsampling to full size."""
import math

import torch
import torch.nn.functional as F


def pixel_value(value: float, mean, std, like: torch.Tensor) -> torch.Tensor:
    """The normalised value [1, ch, 1, 1] of a raw pixel value (IDC pads in [0, 1] pixel space with 0.5)."""
    mean = torch.as_tensor(mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return (value - mean) / std


def decode_zoom(images: torch.Tensor, labels: torch.Tensor, factor: int,
                pad_value: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, ch, H, W] -> [N·f², ch, H, W]: cut every image into f×f patches (side ceil(H/f), padded with
    `pad_value` when H % f != 0, as IDC's decode_zoom) and upsample each bilinearly to (H, W).
    Image-major order: rows i·f²..(i+1)·f²−1 are image i's patches (row-major); labels are repeated
    alike. Differentiable in `images`. IDC orders patch-major; the set of decoded images is the same."""
    if factor < 1:
        raise ValueError(f"multi-formation factor must be >= 1, got {factor}")
    if factor == 1:
        return images, labels
    n, ch, height, width = images.shape
    sh, sw = math.ceil(height / factor), math.ceil(width / factor)
    if sh * factor != height or sw * factor != width:
        padded = torch.empty(n, ch, sh * factor, sw * factor, dtype=images.dtype, device=images.device)
        padded[:] = torch.as_tensor(pad_value, dtype=images.dtype, device=images.device)
        padded[:, :, :height, :width] = images
        images = padded
    patches = images.reshape(n, ch, factor, sh, factor, sw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n * factor * factor, ch, sh, sw)
    decoded = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
    return decoded, labels.repeat_interleave(factor * factor)


def mix_images(real: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC's `mix` initialisation: f² groups of real images [f²·n, ch, H, W] (group k = rows k·n..) are
    each resized (nearest) to a patch and tiled into n stored images; patch sizes follow IDC (the first
    H % f rows/columns of patches are one pixel larger)."""
    groups = factor * factor
    if real.shape[0] % groups:
        raise ValueError(f"mix_images needs a multiple of factor² = {groups} images, got {real.shape[0]}")
    n = real.shape[0] // groups
    _, ch, height, width = real.shape
    out = torch.empty(n, ch, height, width, dtype=real.dtype, device=real.device)
    s, remained = height // factor, height % factor
    sw, remained_w = width // factor, width % factor
    k, h_loc = 0, 0
    for i in range(factor):
        h_r = s + 1 if i < remained else s
        w_loc = 0
        for j in range(factor):
            w_r = sw + 1 if j < remained_w else sw
            out[:, :, h_loc:h_loc + h_r, w_loc:w_loc + w_r] = F.interpolate(real[k * n:(k + 1) * n], size=(h_r, w_r))
            w_loc += w_r
            k += 1
        h_loc += h_r
    return out


def decode_for(engine, images: torch.Tensor, labels: torch.Tensor, factor: int):
    """decode_zoom with the dataset's normalised value of pixel 0.5 as padding (IDC pads raw images)."""
    if factor == 1:
        return images, labels
    pad = pixel_value(0.5, engine.train.mean, engine.train.std, images)
    return decode_zoom(images, labels, factor, pad)
