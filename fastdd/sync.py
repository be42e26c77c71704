"""Host-sync counter: a context manager that records every device-to-host synchronisation made inside it.

Usage::

    from fastdd.sync import count_host_syncs

    with count_host_syncs() as syncs:
        loss = fastdd.ops.mean_match(real, real_seg, syn, syn_seg, S)
        loss.sum().backward()
    assert syncs.count == 0, syncs.report()

``count_host_syncs(cuda=None, cpu_proxies=True)`` returns a ``HostSyncCounter`` with

* ``count`` (int) and ``events`` (list of str, one per sync: what synced and the calling ``file:line``);
* ``report()`` a printable summary, and ``assert_none(what="")`` raising ``AssertionError`` with that summary.

Two sources are counted, so the same test means the same thing with and without a GPU:

* CUDA (``cuda=True``, default when a GPU is visible): ``torch.cuda.set_sync_debug_mode("warn")`` with the warnings
  captured; every synchronising CUDA call (``.item()`` on a CUDA tensor, D2H copies, ``nonzero``, ``bincount``,
  pageable H2D copies, ...) is one event. The previous debug mode is restored on exit.
* CPU proxies (``cpu_proxies=True``): on tensors that are not on CUDA there is no device to wait for, so the calls
  that WOULD sync on a GPU are counted instead, by patching ``Tensor.item/tolist/numpy/cpu/__int__/__float__/
  __bool__/__index__/__complex__/nonzero/unique/unique_consecutive/bincount/masked_select/equal`` and ``torch.nonzero/
  unique/bincount/masked_select/equal/allclose/is_nonzero`` (``repeat_interleave`` only without ``output_size``).
  Calls made from inside the ``triton`` package are ignored: that is the interpreter emulating the device. Calls
  on CUDA tensors are left to the CUDA source, so nothing is counted twice.

``host_only()`` marks code that reads values living on the host by design (a CPU-generator draw): the CPU
proxies do not count calls inside it; CUDA syncs inside it are still counted.

The patches are process-wide while the context is open; counters may nest (the innermost one counts). Not
thread-safe: open it on the thread that runs the code under test.
"""
import contextlib
import functools
import sys
import warnings

import torch

_TENSOR_METHODS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__", "__complex__",
                   "nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "equal")
_TORCH_FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "equal", "allclose", "is_nonzero")
_SYNC_WARNING = "called a synchronizing CUDA operation"
_active: list = []
_depth = [0]  # > 0 while inside a patched call, so torch's own nested calls are not counted again


def _caller(depth: int = 2) -> tuple[str, str]:
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", ""), f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _first_tensor(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _counting(name: str, original):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if _active and not _depth[0] and not (name.endswith("repeat_interleave") and
                                              kwargs.get("output_size") is not None):
            tensor = _first_tensor(args, kwargs)
            module, where = _caller()
            if tensor is not None and not tensor.is_cuda and not module.startswith("triton"):
                _active[-1]._record(f"{name} at {where}")
        _depth[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            _depth[0] -= 1
    return wrapper


class HostSyncCounter:
    """Counts host syncs between __enter__ and __exit__; see the module docstring."""

    def __init__(self, cuda: bool | None = None, cpu_proxies: bool = True):
        self.cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
        if self.cuda and not torch.cuda.is_available():
            raise ValueError("count_host_syncs: cuda=True but no CUDA GPU is visible")
        self.cpu_proxies = cpu_proxies
        self.events: list[str] = []
        self._saved: list = []
        self._warnings = None
        self._caught = None
        self._old_mode = None

    @property
    def count(self) -> int:
        return len(self.events)

    def _record(self, event: str) -> None:
        self.events.append(event)

    def _patch(self, owner, name: str, label: str) -> None:
        original = owner.__dict__.get(name, getattr(owner, name, None))
        if original is None:
            return
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, _counting(label, original))

    def __enter__(self) -> "HostSyncCounter":
        if self.cpu_proxies and not any(c._saved for c in _active):  # installed once, by the outermost one
            for name in _TENSOR_METHODS + ("repeat_interleave",):
                self._patch(torch.Tensor, name, f"Tensor.{name}")
            for name in _TORCH_FUNCTIONS + ("repeat_interleave",):
                self._patch(torch, name, f"torch.{name}")
        if self.cuda:
            self._old_mode = torch.cuda.get_sync_debug_mode()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._old_mode)
            self._warnings.__exit__(*exc)
            for w in self._caught:
                if _SYNC_WARNING in str(w.message):
                    self._record(f"CUDA sync at {w.filename}:{w.lineno}")
                else:  # not ours: hand it back to whoever is listening
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for owner, name, previous in reversed(self._saved):
            if previous is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        self._saved.clear()

    def report(self) -> str:
        return f"{self.count} host sync(s)" + "".join(f"\n  {e}" for e in self.events)

    def assert_none(self, what: str = "") -> None:
        if self.events:
            raise AssertionError(f"{what + ': ' if what else ''}{self.report()}")


_MISSING = object()


@contextlib.contextmanager
def host_only():
    """Calls inside read host-side tensors by design: not counted as CPU proxies (CUDA syncs still are)."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def count_host_syncs(cuda: bool | None = None, cpu_proxies: bool = True) -> HostSyncCounter:
    """Context manager counting host syncs (CUDA sync debug mode and/or CPU proxies); see the module docstring."""
    return HostSyncCounter(cuda=cuda, cpu_proxies=cpu_proxies)
