// CPU kernels for fastdd::segment_mean (row means per segment id) and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"

namespace fastdd {
namespace {

template <typename scalar_t, typename acc_t>
void accumulate_rows(const scalar_t* __restrict__ x, const int64_t* __restrict__ seg, acc_t* __restrict__ acc,
                     int64_t row_begin, int64_t row_end, int64_t D, int64_t d0, int64_t d1) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* __restrict__ xi = x + i * D;
    acc_t* __restrict__ ai = acc + seg[i] * D;
    for (int64_t d = d0; d < d1; ++d) ai[d] += static_cast<acc_t>(xi[d]);
  }
}

at::Tensor segment_mean_cpu(const at::Tensor& x_in, const at::Tensor& seg_in, int64_t num_segments) {
  check_segment_ids("segment_mean", "seg", seg_in, num_segments);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor seg = seg_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), S = num_segments;
  const at::Tensor counts = segment_counts(seg, S);
  at::Tensor out = at::empty({S, D}, x.options());
  if (S == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "segment_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t threads = at::get_num_threads();
    // Fixed row groups, each with its own accumulator, handed out dynamically: a thread slowed by a busy
    // core takes fewer groups, yet each group's summation order (and the final reduction) stays fixed,
    // so results are deterministic. Few groups when S*D is large relative to the rows.
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>({4 * threads, N / std::max<int64_t>(1, 2 * S), N / 64}));
    const int64_t rows_per_group = (N + groups - 1) / groups;
    at::Tensor acc = at::zeros({groups, S, D}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* sp = seg.data_ptr<int64_t>();
    acc_t* ap = acc.data_ptr<acc_t>();
    if (groups == 1) {
      accumulate_rows<scalar_t, acc_t>(xp, sp, ap, 0, N, D, 0, D);
    } else {
      _Pragma("omp parallel for schedule(dynamic, 1)")
      for (int64_t g = 0; g < groups; ++g) {
        accumulate_rows<scalar_t, acc_t>(xp, sp, ap + g * S * D, g * rows_per_group,
                                         std::min(N, (g + 1) * rows_per_group), D, 0, D);
      }
    }
    const int64_t* cp = counts.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const acc_t inv = cp[s] > 0 ? acc_t(1) / static_cast<acc_t>(cp[s]) : acc_t(0);
        scalar_t* __restrict__ os = op + s * D;
        const acc_t* __restrict__ a0 = ap + s * D;
        for (int64_t d = 0; d < D; ++d) {
          acc_t total = a0[d];
          for (int64_t g = 1; g < groups; ++g) total += ap[(g * S + s) * D + d];
          os[d] = static_cast<scalar_t>(total * inv);
        }
      }
    });
  });
  return out;
}

at::Tensor segment_mean_backward_cpu(const at::Tensor& grad_in, const at::Tensor& seg_in) {
  const int64_t S = grad_in.size(0);
  check_segment_ids("segment_mean_backward", "seg", seg_in, S);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor seg = seg_in.contiguous();
  const int64_t N = seg.size(0), D = grad.size(1);
  const at::Tensor counts = segment_counts(seg, S);
  at::Tensor out = at::empty({N, D}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "segment_mean_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t* sp = seg.data_ptr<int64_t>();
    const int64_t* cp = counts.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = sp[i];
        const acc_t inv = acc_t(1) / static_cast<acc_t>(cp[s]);
        const scalar_t* __restrict__ gs = gp + s * D;
        scalar_t* __restrict__ oi = op + i * D;
        for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<scalar_t>(static_cast<acc_t>(gs[d]) * inv);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("segment_mean_backward", &segment_mean_backward_cpu);
}

}  // namespace fastdd
