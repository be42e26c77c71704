"""Real rows to the device: gathered from the (memory-mapped) uint8 set into reused pinned buffers, copied one
pass ahead on a side CUDA stream, normalised on the device; a plain gather + normalise on the CPU."""
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

    CUDA: each pass is gathered into one of SLOTS pinned uint8 buffers (grown to the largest pass, then reused),
    copied with non_blocking=True on a side stream, and the NEXT pass is gathered and its copy issued as soon as
    the current one is handed out, so that copy overlaps the caller's compute on the current stream. The current
    stream waits for the copy before normalising, and the copied tensor is recorded on it (record_stream) so the
    allocator does not hand its memory to the side stream early. Reusing a pinned slot waits (on the host) for
    that slot's previous copy only, which was issued two passes earlier. CPU: no pinning, a plain gather."""

    def __init__(self, dataset: ImageDataset, device):
        self.dataset, self.device = dataset, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._slots: list[torch.Tensor | None] = [None] * SLOTS
        self._copied: list = [None] * SLOTS  # CUDA event: the slot's last copy has been read out
        self._stream = None
        self._turn = 0

    def passes(self, index: torch.Tensor, bounds: list[tuple[int, int]]):
        index = index if index.device.type == "cpu" else index.cpu()
        if not self.cuda:
            for lo, hi in bounds:
                yield self.dataset.normalize(self.dataset.images[index[lo:hi]], device=self.device)
            return
        pending = self._stage(index[bounds[0][0]:bounds[0][1]]) if bounds else None
        for k in range(len(bounds)):
            ready = self._finish(pending)
            if k + 1 < len(bounds):
                lo, hi = bounds[k + 1]
                pending = self._stage(index[lo:hi])  # its copy runs while the caller computes on `ready`
            yield ready

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
