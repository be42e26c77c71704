// CPU kernels for fastdd::mean_match (per-segment squared distance of real and syn row means) and its backward.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"

namespace fastdd {
namespace {

// acc[seg[i]] += x[i] over columns [d0, d1); a row not yet `touched` is written instead (no zero-fill pass).
template <typename scalar_t, typename acc_t>
void add_rows(const scalar_t* __restrict__ x, const int64_t* __restrict__ seg, acc_t* __restrict__ acc,
              uint8_t* touched, int64_t row_begin, int64_t row_end, int64_t D, int64_t d0, int64_t d1) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t s = seg[i];
    const scalar_t* __restrict__ xi = x + i * D;
    acc_t* __restrict__ ai = acc + s * D;
    if (touched[s]) {
      for (int64_t d = d0; d < d1; ++d) ai[d] += static_cast<acc_t>(xi[d]);
    } else {
      for (int64_t d = d0; d < d1; ++d) ai[d] = static_cast<acc_t>(xi[d]);
      touched[s] = 1;
    }
  }
}

// out[i] = scale[u]·(coef[u]·base[u] + extra[u]) for u = seg[i]: each gradient row is written once, directly.
template <typename scalar_t, typename acc_t>
void write_rows(const int64_t* __restrict__ seg, int64_t row_begin, int64_t row_end, int64_t D,
                const acc_t* scale, const acc_t* coef, const acc_t* base, const acc_t* extra,
                scalar_t* __restrict__ out) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t u = seg[i];
    const acc_t sc = scale[u], cb = scale[u] * coef[u];
    const acc_t* __restrict__ bu = base + u * D;
    scalar_t* __restrict__ oi = out + i * D;
    if (extra) {
      const acc_t* __restrict__ eu = extra + u * D;
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<scalar_t>(cb * bu[d] + sc * eu[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<scalar_t>(cb * bu[d]);
    }
  }
}

// Threads worth using for `elements` of streaming work (an OpenMP region costs more than small work saves).
int64_t useful_threads(int64_t elements) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), elements / at::internal::GRAIN_SIZE));
}

void check_ids(const char* op, const at::Tensor& real_seg, const at::Tensor& syn_seg,
               const std::optional<at::Tensor>& real_to_syn, int64_t S) {
  check_segment_ids(op, "real_seg", real_seg, S);
  check_segment_ids(op, "syn_seg", syn_seg, S);
  if (real_to_syn.has_value()) {
    TORCH_CHECK_VALUE(real_to_syn->dim() == 1 && real_to_syn->size(0) == S, op, ": real_to_syn must have ",
                      S, " entries (num_segments), got shape ", real_to_syn->sizes());
    check_segment_ids(op, "real_to_syn", *real_to_syn, S);
  }
}

// Synthetic segment matched with each real segment (identity without real_to_syn), as an owned int64 [S].
at::Tensor partner_ids(const std::optional<at::Tensor>& real_to_syn, int64_t S, const at::TensorOptions& opts) {
  return real_to_syn.has_value() ? real_to_syn->contiguous() : at::arange(S, opts.dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> mean_match_cpu(const at::Tensor& real_in, const at::Tensor& real_seg_in,
                                                  const at::Tensor& syn_in, const at::Tensor& syn_seg_in,
                                                  int64_t num_segments,
                                                  const std::optional<at::Tensor>& real_to_syn) {
  const int64_t S = num_segments;
  TORCH_CHECK_VALUE(real_in.dim() == 2 && syn_in.dim() == 2 && real_in.size(1) == syn_in.size(1),
                    "mean_match: real and syn must be 2-D with equal feature counts, got ", real_in.sizes(),
                    " and ", syn_in.sizes());
  TORCH_CHECK_TYPE(real_in.scalar_type() == syn_in.scalar_type(), "mean_match: syn must have real's dtype");
  TORCH_CHECK_VALUE(real_seg_in.numel() == real_in.size(0) && syn_seg_in.numel() == syn_in.size(0),
                    "mean_match: real_seg/syn_seg lengths must match the rows of real/syn");
  check_ids("mean_match", real_seg_in, syn_seg_in, real_to_syn, S);
  const at::Tensor real = real_in.contiguous(), syn = syn_in.contiguous();
  const at::Tensor real_seg = real_seg_in.contiguous(), syn_seg = syn_seg_in.contiguous();
  const int64_t Nr = real.size(0), Ns = syn.size(0), D = real.size(1);
  const at::Tensor n_real = segment_counts(real_seg, S), n_syn = segment_counts(syn_seg, S);
  const at::Tensor partner = partner_ids(real_to_syn, S, real.options());
  const auto acc_type = real.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (S == 0 || D == 0) return {at::zeros({S}, real.options()), at::zeros({S, D}, real.options().dtype(acc_type))};
  // Outputs and scratch are written in full by the tasks (no zero-fill passes: each is a parallel region).
  at::Tensor loss = at::empty({S}, real.options());
  at::Tensor diff = at::empty({S, D}, real.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, real.scalar_type(), "mean_match_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // `real` is streamed once, in ONE parallel region, into accumulators private to each task. Whole rows
    // stream best: they are used while per-thread [2S, D] accumulators stay small next to the input (they
    // are reduced serially afterwards); otherwise threads split the columns, share one accumulator and each
    // finalises its own columns inside the region.
    const int64_t threads = useful_threads((Nr + Ns) * D);
    const bool split_rows = threads > 1 && 2 * S * threads * 4 <= Nr + Ns;
    const int64_t n_rchunks = split_rows ? threads : 1;
    const int64_t block_d = split_rows ? D : std::max<int64_t>(64, (D + threads - 1) / threads);
    const int64_t n_dblocks = (D + block_d - 1) / block_d;
    at::Tensor acc = at::empty({n_rchunks, 2 * S, D}, diff.options());  // per chunk: real sums, then syn sums
    std::vector<uint8_t> touched(n_rchunks * n_dblocks * 2 * S, 0);     // per task: accumulator rows written
    at::Tensor partial = at::empty({n_dblocks, S}, diff.options());     // squared distance per column block
    acc_t* ap = acc.data_ptr<acc_t>();
    acc_t* pap = partial.data_ptr<acc_t>();
    acc_t* dp = diff.data_ptr<acc_t>();
    const scalar_t* rp = real.data_ptr<scalar_t>();
    const scalar_t* sp = syn.data_ptr<scalar_t>();
    const int64_t* rsp = real_seg.data_ptr<int64_t>();
    const int64_t* ssp = syn_seg.data_ptr<int64_t>();
    const int64_t* nrp = n_real.data_ptr<int64_t>();
    const int64_t* nsp = n_syn.data_ptr<int64_t>();
    const int64_t* pp = partner.data_ptr<int64_t>();
    // diff and per-block squared distance from chunk 0's sums (other chunks are folded into it first); the
    // rows read are exactly those of non-empty segments, all written by then.
    auto finalize = [&](int64_t b, int64_t d0, int64_t d1) {
      constexpr int64_t kLanes = 16;  // independent partial sums let the squared-norm loop vectorise
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = pp[s];
        acc_t* __restrict__ ds = dp + s * D;
        acc_t lanes[kLanes] = {};
        if (nrp[s] == 0 || nsp[t] == 0) {  // an empty side: zero loss, zero diff
          std::fill(ds + d0, ds + d1, acc_t(0));
        } else {
          const acc_t inv_r = acc_t(1) / static_cast<acc_t>(nrp[s]);
          const acc_t inv_s = acc_t(1) / static_cast<acc_t>(nsp[t]);
          const acc_t* __restrict__ real_sum = ap + s * D;
          const acc_t* __restrict__ syn_sum = ap + (S + t) * D;
          int64_t d = d0;
          for (; d + kLanes <= d1; d += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) {
              const acc_t v = real_sum[d + k] * inv_r - syn_sum[d + k] * inv_s;
              ds[d + k] = v;
              lanes[k] += v * v;
            }
          }
          for (; d < d1; ++d) {
            const acc_t v = real_sum[d] * inv_r - syn_sum[d] * inv_s;
            ds[d] = v;
            lanes[0] += v * v;
          }
        }
        acc_t total = 0;
        for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
        pap[b * S + s] = total;
      }
    };
    // Whole-row blocks are claimed from a shared counter rather than split statically, so a thread that the
    // OS deschedules (a busy machine) holds back at most one block.
    const int64_t block_rows = std::max<int64_t>(1, 4 * at::internal::GRAIN_SIZE / D);
    const int64_t real_blocks = (Nr + block_rows - 1) / block_rows;
    const int64_t all_blocks = real_blocks + (Ns + block_rows - 1) / block_rows;
    std::atomic<int64_t> next_block{0};
    at::parallel_for(0, n_rchunks * n_dblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / n_dblocks, b = task % n_dblocks;
        const int64_t d0 = b * block_d, d1 = std::min(D, d0 + block_d);
        acc_t* chunk = ap + r * 2 * S * D;
        uint8_t* flags = touched.data() + task * 2 * S;
        if (!split_rows) {
          add_rows<scalar_t, acc_t>(rp, rsp, chunk, flags, 0, Nr, D, d0, d1);
          add_rows<scalar_t, acc_t>(sp, ssp, chunk + S * D, flags + S, 0, Ns, D, d0, d1);
          finalize(b, d0, d1);
          continue;
        }
        for (int64_t k = next_block++; k < all_blocks; k = next_block++) {
          if (k < real_blocks) {
            add_rows<scalar_t, acc_t>(rp, rsp, chunk, flags, k * block_rows, std::min(Nr, (k + 1) * block_rows),
                                      D, 0, D);
          } else {
            const int64_t j = k - real_blocks;
            add_rows<scalar_t, acc_t>(sp, ssp, chunk + S * D, flags + S, j * block_rows,
                                      std::min(Ns, (j + 1) * block_rows), D, 0, D);
          }
        }
      }
    });
    if (split_rows) {
      for (int64_t r = 1; r < n_rchunks; ++r) {
        for (int64_t row = 0; row < 2 * S; ++row) {
          if (!touched[r * 2 * S + row]) continue;
          const acc_t* __restrict__ src = ap + (r * 2 * S + row) * D;
          acc_t* __restrict__ dst = ap + row * D;
          if (touched[row]) {
            for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          } else {
            std::copy(src, src + D, dst);
            touched[row] = 1;
          }
        }
      }
      finalize(0, 0, D);
    }
    scalar_t* lp = loss.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) {
      acc_t total = 0;
      for (int64_t b = 0; b < n_dblocks; ++b) total += pap[b * S + s];
      lp[s] = static_cast<scalar_t>(total);
    }
  });
  return {loss, diff};
}

std::tuple<at::Tensor, at::Tensor> mean_match_backward_cpu(
    const std::optional<at::Tensor>& grad, const at::Tensor& diff_in, const std::optional<at::Tensor>& grad_diff,
    const at::Tensor& real_seg_in, const at::Tensor& syn_seg_in, const std::optional<at::Tensor>& real_to_syn,
    bool real_grad, bool syn_grad, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(diff_in.dim() == 2, "mean_match_backward: diff must be 2-D, got ", diff_in.sizes());
  const int64_t S = diff_in.size(0), D = diff_in.size(1);
  check_ids("mean_match_backward", real_seg_in, syn_seg_in, real_to_syn, S);
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(diff_in.scalar_type() == acc_type, "mean_match_backward: diff must be ", acc_type,
                   " for gradients of dtype ", dtype, ", got ", diff_in.scalar_type());
  if (grad.has_value())
    TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == S, "mean_match_backward: grad must have shape [", S,
                      "], got ", grad->sizes());
  if (grad_diff.has_value())
    TORCH_CHECK_VALUE(grad_diff->sizes() == diff_in.sizes(), "mean_match_backward: grad_diff must have shape ",
                      diff_in.sizes(), ", got ", grad_diff->sizes());
  const at::Tensor real_seg = real_seg_in.contiguous(), syn_seg = syn_seg_in.contiguous();
  const int64_t Nr = real_grad ? real_seg.size(0) : 0, Ns = syn_grad ? syn_seg.size(0) : 0;
  const auto out_opts = diff_in.options().dtype(dtype);
  at::Tensor grad_real = at::empty({Nr, D}, out_opts);
  at::Tensor grad_syn = at::empty({Ns, D}, out_opts);
  if (S == 0 || D == 0 || (!grad.has_value() && !grad_diff.has_value()) || Nr + Ns == 0)
    return {grad_real.zero_(), grad_syn.zero_()};
  const at::Tensor diff = diff_in.contiguous();
  const at::Tensor g = grad.has_value() ? grad->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor gd = grad_diff.has_value() ? grad_diff->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor n_real = segment_counts(real_seg, S), n_syn = segment_counts(syn_seg, S);
  const at::Tensor partner = partner_ids(real_to_syn, S, diff.options());
  const bool mapped = real_to_syn.has_value();
  // Row i of segment u is written once as scale[u]·(coef[u]·base[u] + extra[u]). With h = 2·grad·diff +
  // grad_diff: real rows take valid/n_real·h; syn rows take -valid/n_syn·h when real_to_syn is the identity,
  // else -1/n_syn[t]·table[t] with table[t] = Σ_{s→t} valid·h[s], built first in a small [S, D] pass.
  at::Tensor coefs = at::empty({4, S}, diff.options());  // 2·grad, real scale, syn scale, ones
  at::Tensor table = at::empty({syn_grad && mapped ? S : 0, D}, diff.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mean_match_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* dp = diff.data_ptr<acc_t>();
    const acc_t* gp = g.defined() ? g.data_ptr<acc_t>() : nullptr;
    const acc_t* gdp = gd.defined() ? gd.data_ptr<acc_t>() : nullptr;
    const int64_t* nrp = n_real.data_ptr<int64_t>();
    const int64_t* nsp = n_syn.data_ptr<int64_t>();
    const int64_t* pp = partner.data_ptr<int64_t>();
    acc_t* two_g = coefs.data_ptr<acc_t>();
    acc_t* real_scale = two_g + S;
    acc_t* syn_scale = two_g + 2 * S;
    acc_t* ones = two_g + 3 * S;
    for (int64_t s = 0; s < S; ++s) {
      const bool valid = nrp[s] > 0 && nsp[pp[s]] > 0;
      const bool syn_valid = mapped ? nsp[s] > 0 : valid;
      two_g[s] = gp ? acc_t(2) * gp[s] : acc_t(0);
      real_scale[s] = valid ? acc_t(1) / static_cast<acc_t>(nrp[s]) : acc_t(0);
      syn_scale[s] = syn_valid ? acc_t(-1) / static_cast<acc_t>(nsp[s]) : acc_t(0);
      ones[s] = acc_t(1);
    }
    acc_t* tp = table.numel() ? table.data_ptr<acc_t>() : nullptr;
    if (tp) {
      // Column blocks: several real segments may add into one table row.
      at::parallel_for(0, D, std::max<int64_t>(64, at::internal::GRAIN_SIZE / S), [&](int64_t d0, int64_t d1) {
        for (int64_t t = 0; t < S; ++t) std::fill(tp + t * D + d0, tp + t * D + d1, acc_t(0));
        for (int64_t s = 0; s < S; ++s) {
          if (real_scale[s] == acc_t(0)) continue;  // an empty side: no contribution
          const acc_t* __restrict__ ds = dp + s * D;
          acc_t* __restrict__ ts = tp + pp[s] * D;
          for (int64_t d = d0; d < d1; ++d) ts[d] += two_g[s] * ds[d];
          if (gdp) {
            const acc_t* __restrict__ gds = gdp + s * D;
            for (int64_t d = d0; d < d1; ++d) ts[d] += gds[d];
          }
        }
      });
    }
    const int64_t* rsp = real_seg.data_ptr<int64_t>();
    const int64_t* ssp = syn_seg.data_ptr<int64_t>();
    scalar_t* grp = grad_real.data_ptr<scalar_t>();
    scalar_t* gsp = grad_syn.data_ptr<scalar_t>();
    at::parallel_for(0, Nr + Ns, std::max<int64_t>(1, at::internal::GRAIN_SIZE / D), [&](int64_t i0, int64_t i1) {
      if (i0 < Nr) write_rows<scalar_t, acc_t>(rsp, i0, std::min(i1, Nr), D, real_scale, two_g, dp, gdp, grp);
      if (i1 > Nr) {
        const int64_t j0 = std::max(i0, Nr) - Nr, j1 = i1 - Nr;
        if (tp) {
          write_rows<scalar_t, acc_t>(ssp, j0, j1, D, syn_scale, ones, tp, nullptr, gsp);
        } else {
          write_rows<scalar_t, acc_t>(ssp, j0, j1, D, syn_scale, two_g, dp, gdp, gsp);
        }
      }
    });
  });
  return {grad_real, grad_syn};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("mean_match", &mean_match_cpu);
  m.impl("mean_match_backward", &mean_match_backward_cpu);
}

}  // namespace fastdd
