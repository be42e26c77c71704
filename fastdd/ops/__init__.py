"""fastdd ops: one public function per op, each dispatching to C++, Triton or the pure-torch reference."""
from fastdd.ops.segment_mean import segment_mean
from fastdd.ops.kmeans_assign import kmeans_assign
from fastdd.ops.cvar import cvar
from fastdd.ops.mean_match import mean_match
from fastdd.ops.spectral_surgery import spectral_surgery
from fastdd.ops.norm_act_pool import norm_act_pool

__all__ = ["segment_mean", "kmeans_assign", "cvar", "mean_match", "spectral_surgery", "norm_act_pool"]
