"""fastdd ops: one public function per op, each dispatching to C++, Triton or the pure-torch reference."""
from fastdd.ops.segment_mean import segment_mean

__all__ = ["segment_mean"]
