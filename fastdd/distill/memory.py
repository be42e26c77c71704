"""Memory budgets: parse `memory_budget`, derive the default from free memory, measure activation bytes per row,
and split classes into consecutive chunks whose rows fit the budget."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
AUTO_FRACTION = {"cuda": 0.8, "cpu": 0.5}  # of free device memory / available RAM used for activations
MIN_BUDGET = 64 * 2**20
# Peak of a gradient-carrying row over its saved tensors: the backward's activation gradients and the
# augmentation's copies come on top (measured 1.38x for ConvNetD4, 64 px, DSA on; see bench_scale).
GRAD_ROW_OVERHEAD = 1.5


def parse_budget(value) -> int | None:
    """`memory_budget` in bytes: an int, "8GB" / "512MiB" / "1.5GB", or "auto"/None (→ None: derive)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ValueError(f"config key 'memory_budget' must be bytes, e.g. 8GB, or auto; got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"config key 'memory_budget' must be bytes, e.g. 8GB, 512MiB or auto; got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    budget = int(number * UNITS[unit])
    if budget < MIN_BUDGET:
        raise ValueError(f"config key 'memory_budget' must be at least 64MiB, got {value!r}")
    return budget


def available_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: CUDA's allocated bytes, or the host process's anonymous resident memory
    (resident minus file-backed pages: a memory-mapped shard's pages are reclaimable cache, not held)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return max(0, int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> None:
    """Hand memory glibc keeps after frees back to the OS (malloc_trim), so one phase's peak (a step, the
    evaluation) does not stack on the last one's; a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def resolve_budget(value, device: torch.device) -> int:
    """The budget in bytes: the configured one, or a fraction of what is free now."""
    budget = parse_budget(value)
    if budget is not None:
        return budget
    fraction = AUTO_FRACTION.get(torch.device(device).type, 0.5)
    return max(MIN_BUDGET, int(available_bytes(device) * fraction))


def activation_bytes_per_row(net: torch.nn.Module, sample: torch.Tensor, grad: bool, forward=None) -> int:
    """Bytes one input row costs in a forward of `net` (`forward(net, x)`, default net.embed):
    grad=True — the tensors autograd saves for backward (measured with saved-tensor hooks; parameters and
    buffers excluded), plus the input;
    grad=False — the largest input + output pair of any leaf module (what a no-grad pass holds at once)."""
    forward = forward or (lambda n, x: n.embed(x))
    x = sample[:1]
    if grad:
        x = x.detach().clone().requires_grad_(True)  # a storage of its own: counted once, below
        total = [x.numel() * x.element_size()]
        # parameters and buffers are saved too, but once per network, not per row
        seen = {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers(), x)}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(net, x)
        return int(total[0])
    peak = [x.numel() * x.element_size()]

    def hook(module, inputs, output):
        size = sum(t.numel() * t.element_size() for t in (*inputs, output) if torch.is_tensor(t))
        peak[0] = max(peak[0], size)
    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            forward(net, x)
    finally:
        for h in handles:
            h.remove()
    return int(peak[0])


@dataclass(frozen=True)
class ChunkPlan:
    class_chunks: list[list[int]]   # consecutive class ids, each chunk one pass with gradient
    real_rows_per_pass: int         # real rows a no-grad forward may take at once

    @property
    def num_chunks(self) -> int:
        return len(self.class_chunks)


def plan_chunks(budget: int, rows_per_class: list[int], bytes_per_row: int, real_rows_per_class: list[int],
                real_bytes_per_row: int, reserved: int = 0) -> ChunkPlan:
    """Split classes into consecutive chunks whose gradient-carrying rows (rows_per_class × bytes_per_row) fit
    the budget after the real no-grad pass (real_rows_per_pass × real_bytes_per_row) and `reserved` bytes.
    Classes with no rows are kept inside chunks (they cost nothing). One chunk when everything fits."""
    free = budget - reserved
    max_real = max(real_rows_per_class, default=0)
    real_rows = max(1, min(max(max_real, 1), (free // 2) // max(real_bytes_per_row, 1)))
    grad_budget = free - real_rows * real_bytes_per_row
    largest = max(rows_per_class, default=0) * bytes_per_row
    if largest > grad_budget:
        need = largest + real_bytes_per_row + reserved
        raise ValueError(f"config key 'memory_budget' ({budget / 2**20:.0f} MiB) is too small: one class needs "
                         f"≈{need / 2**20:.0f} MiB (its {max(rows_per_class)} rows carry gradients together)")
    chunks, chunk, used = [], [], 0
    for c, rows in enumerate(rows_per_class):
        cost = rows * bytes_per_row
        if chunk and used + cost > grad_budget:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(c)
        used += cost
    if chunk:
        chunks.append(chunk)
    return ChunkPlan(chunks, int(real_rows))
