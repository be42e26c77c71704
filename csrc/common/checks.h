// Shared argument checks for fastdd kernels: segment-id range checks that name the argument.
#pragma once
#include <ATen/ATen.h>

namespace fastdd {

// Raises ValueError naming `arg` when any id is outside [0, num_segments).
inline void check_segment_ids(const char* op, const char* arg, const at::Tensor& ids, int64_t num_segments) {
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, op, ": ", arg, " must be 1-D, got shape ", ids.sizes());
  if (ids.numel() == 0) return;
  const auto minmax = at::aminmax(ids);
  const int64_t lo = std::get<0>(minmax).item<int64_t>(), hi = std::get<1>(minmax).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < num_segments, op, ": ", arg, " ids must lie in [0, ", num_segments,
                    "), found values in [", lo, ", ", hi, "]");
}

// Number of rows carrying each id (int64 [num_segments]); ids must already be checked.
inline at::Tensor segment_counts(const at::Tensor& ids, int64_t num_segments) {
  return at::bincount(ids, {}, num_segments).to(at::kLong);
}

}  // namespace fastdd
