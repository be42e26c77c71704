"""Host-to-device staging: real rows gathered from the (memory-mapped) uint8 set into reused pinned buffers,
copied on a side CUDA stream while the device computes on the previous pass, normalised on the device (a plain
gather on the CPU); small host tensors and fresh networks moved with pinned non_blocking copies (no host sync)."""
from __future__ import annotations

import torch

from .dataset import ImageDataset

SLOTS = 2  # pinned buffers in turn: pass k+1 is gathered while pass k's copy may still be in flight


def gather_rows(images: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """images[index] written into `out` (its first len(index) rows) without a new allocation; returns that view."""
    view = out[:index.numel()]
    torch.index_select(images, 0, index, out=view)
    return view


class RealStager:
    """`passes(index, bounds)` yields the normalised rows index[lo:hi] on `device` for each (lo, hi) in order.

    CUDA: a pass is gathered into one of SLOTS pinned uint8 buffers (grown to the largest pass, then reused) and
    copied with non_blocking=True on a side stream when the caller asks for it, i.e. after the caller has queued
    its compute on the previous pass (or the previous chunk's synthetic forward and backward): the host gather
    and the copy run while the device is still busy with that compute. The current stream waits for the copy's
    event (a device-side wait), the copied tensor is recorded on it (record_stream) so the allocator does not
    hand its memory back to the side stream early, and it is normalised there. Reusing a pinned slot waits on
    the host for that slot's previous copy, issued two passes earlier. CUDA only (the engine gathers directly
    on the CPU)."""

    def __init__(self, dataset: ImageDataset, device):
        self.dataset, self.device = dataset, torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"RealStager stages rows for a CUDA device, got {self.device}")
        self._slots: list[torch.Tensor | None] = [None] * SLOTS
        self._copied: list = [None] * SLOTS  # CUDA event: the slot's last copy has read its bytes
        self._stream = None
        self._turn = 0

    def passes(self, index: torch.Tensor, bounds: list[tuple[int, int]]):
        index = index if index.device.type == "cpu" else index.cpu()
        for lo, hi in bounds:
            yield self._finish(self._stage(index[lo:hi]))

    def _stage(self, index: torch.Tensor):
        """Gather into the next pinned slot and issue its copy on the side stream -> (device uint8, event)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        slot = self._turn
        self._turn = (self._turn + 1) % SLOTS
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the slot's previous copy has read its bytes
        images = self.dataset.images
        buffer = self._slots[slot]
        if buffer is None or buffer.shape[0] < index.numel():
            buffer = torch.empty((index.numel(), *images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            self._slots[slot] = buffer
        host = gather_rows(images, index, buffer)
        with torch.cuda.stream(self._stream):
            on_device = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._copied[slot] = done
        return on_device, done

    def _finish(self, staged) -> torch.Tensor:
        on_device, done = staged
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        on_device.record_stream(current)
        return self.dataset.normalize(on_device, device=self.device)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory with non_blocking=True (a pageable copy would
    make the host wait); the pinned block is not reused before the copy has read it (caching host allocator)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def module_to_device(module: torch.nn.Module, device, packed: bool | None = None) -> torch.nn.Module:
    """`module`'s parameters and buffers moved to `device` in place. packed (default: on CUDA): one pinned
    non_blocking copy per dtype, each tensor becoming a view of that dtype's flat device block, instead of one
    blocking copy per tensor."""
    device = torch.device(device)
    if not (device.type == "cuda" if packed is None else packed):
        return module.to(device)
    groups: dict = {}
    for t in (*module.parameters(), *module.buffers()):
        groups.setdefault(t.dtype, []).append(t)
    for tensors in groups.values():
        flat = to_device(torch.cat([t.detach().reshape(-1) for t in tensors]), device)
        offset = 0
        for t in tensors:
            t.data = flat[offset:offset + t.numel()].view_as(t)
            offset += t.numel()
    return module
