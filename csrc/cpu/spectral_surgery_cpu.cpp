// CPU kernel for fastdd::agreement_mask: per-bin domain agreement, mask and masked domain mean of D spectra.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "common/checks.h"

namespace fastdd {
namespace {

constexpr int64_t kChunk = 256;  // bins per stack-resident accumulator block

// In-place sqrt of a chunk. std::sqrt sets errno, which stops GCC vectorising any loop containing it
// (the build has no -fno-math-errno), so x86 uses the SSE packed square root explicitly.
#if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));
inline void sqrt_chunk(float* __restrict__ x, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    vf4 v;
    __builtin_memcpy(&v, x + j, sizeof(v));
    v = __builtin_ia32_sqrtps(v);
    __builtin_memcpy(x + j, &v, sizeof(v));
  }
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}
inline void sqrt_chunk(double* __restrict__ x, int64_t n) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    vd2 v;
    __builtin_memcpy(&v, x + j, sizeof(v));
    v = __builtin_ia32_sqrtpd(v);
    __builtin_memcpy(x + j, &v, sizeof(v));
  }
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}
#else
template <typename scalar_t>
inline void sqrt_chunk(scalar_t* __restrict__ x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::sqrt(x[j]);
}
#endif

// Adds one domain's spectrum (interleaved re, im) into the chunk sums and the sum of magnitudes.
template <typename scalar_t>
void accumulate_domain(const scalar_t* __restrict__ p, scalar_t* __restrict__ sr, scalar_t* __restrict__ si,
                       scalar_t* __restrict__ mag, scalar_t* __restrict__ tmp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t re = p[2 * j], im = p[2 * j + 1];
    sr[j] += re;
    si[j] += im;
    tmp[j] = re * re + im * im;
  }
  sqrt_chunk(tmp, n);
  for (int64_t j = 0; j < n; ++j) mag[j] += tmp[j];
}

// Per-bin finish: agreement, mask weight (divided by D) and the masked mean spectrum.
template <typename scalar_t, bool kHard>
void finish_chunk(const scalar_t* __restrict__ sr, const scalar_t* __restrict__ si, const scalar_t* __restrict__ mag,
                  scalar_t* __restrict__ tmp, scalar_t* __restrict__ out, scalar_t* __restrict__ a_out, int64_t n,
                  scalar_t tau, scalar_t gamma, scalar_t eps, scalar_t inv_d) {
  for (int64_t j = 0; j < n; ++j) tmp[j] = sr[j] * sr[j] + si[j] * si[j];
  sqrt_chunk(tmp, n);
  // den == 0 implies num == 0, so flooring den at the smallest normal gives a = 0 there without a branch.
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  for (int64_t j = 0; j < n; ++j) tmp[j] = std::min(tmp[j] / std::max(mag[j] + eps, tiny), scalar_t(1));
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t a = tmp[j];
    scalar_t w;
    if constexpr (kHard) {
      w = a >= tau ? inv_d : scalar_t(0);
    } else {
      w = a > scalar_t(0) ? std::pow(a, gamma) * inv_d : scalar_t(0);
    }
    out[2 * j] = sr[j] * w;
    out[2 * j + 1] = si[j] * w;
  }
  if (a_out) std::copy_n(tmp, n, a_out);
}

template <typename scalar_t>
void agreement_mask_range(const scalar_t* __restrict__ spec, scalar_t* __restrict__ out, scalar_t* __restrict__ a_out,
                          int64_t D, int64_t M, int64_t c0, int64_t c1, scalar_t tau, scalar_t gamma, bool hard,
                          scalar_t eps) {
  const scalar_t inv_d = scalar_t(1) / static_cast<scalar_t>(D);
  alignas(64) scalar_t sr[kChunk], si[kChunk], mag[kChunk], tmp[kChunk];
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j0 = c * kChunk, n = std::min(kChunk, M - j0);
    std::fill_n(sr, n, scalar_t(0));
    std::fill_n(si, n, scalar_t(0));
    std::fill_n(mag, n, scalar_t(0));
    for (int64_t d = 0; d < D; ++d) accumulate_domain(spec + 2 * (d * M + j0), sr, si, mag, tmp, n);
    scalar_t* ao = a_out ? a_out + j0 : nullptr;
    if (hard) {
      finish_chunk<scalar_t, true>(sr, si, mag, tmp, out + 2 * j0, ao, n, tau, gamma, eps, inv_d);
    } else {
      finish_chunk<scalar_t, false>(sr, si, mag, tmp, out + 2 * j0, ao, n, tau, gamma, eps, inv_d);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> agreement_mask_cpu(const at::Tensor& spectra_in, double tau,
                                                      std::optional<double> gamma, double eps,
                                                      bool return_agreement) {
  constexpr const char* op = "agreement_mask";
  TORCH_CHECK_TYPE(spectra_in.scalar_type() == at::kFloat || spectra_in.scalar_type() == at::kDouble, op,
                   ": spectra must be float32 or float64 (torch.view_as_real of a complex spectrum), got ",
                   spectra_in.scalar_type());
  TORCH_CHECK_VALUE(spectra_in.dim() >= 2 && spectra_in.size(-1) == 2, op,
                    ": spectra must have shape [D, ..., 2] (real view of complex), got ", spectra_in.sizes());
  TORCH_CHECK_VALUE(spectra_in.size(0) >= 2, op, ": spectra needs D >= 2 domains along dim 0, got D=",
                    spectra_in.size(0));
  TORCH_CHECK_VALUE(tau >= 0.0 && tau <= 1.0, op, ": tau must be a number in [0, 1], got ", tau);
  TORCH_CHECK_VALUE(!gamma.has_value() || (std::isfinite(*gamma) && *gamma > 0.0), op,
                    ": gamma must be None (hard mask) or a finite number > 0, got ", gamma.value_or(0.0));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be a finite number >= 0, got ", eps);
  const at::Tensor spectra = spectra_in.contiguous();
  const int64_t D = spectra.size(0);
  const auto bin_shape = spectra.sizes().slice(1, spectra.dim() - 2);
  at::Tensor out = at::empty(spectra.sizes().slice(1), spectra.options());
  at::Tensor a = return_agreement ? at::empty(bin_shape, spectra.options()) : at::empty({0}, spectra.options());
  const int64_t M = out.numel() / 2;
  if (M == 0) return {out, a};
  AT_DISPATCH_FLOATING_TYPES(spectra.scalar_type(), "agreement_mask_cpu", [&] {
    const scalar_t* sp = spectra.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    scalar_t* ap = return_agreement ? a.data_ptr<scalar_t>() : nullptr;
    const auto t = static_cast<scalar_t>(tau), g = static_cast<scalar_t>(gamma.value_or(1.0));
    const auto e = static_cast<scalar_t>(eps);
    const bool hard = !gamma.has_value();
    at::parallel_for(0, (M + kChunk - 1) / kChunk, 16, [=](int64_t c0, int64_t c1) {
      agreement_mask_range<scalar_t>(sp, outp, ap, D, M, c0, c1, t, g, hard, e);
    });
  });
  return {out, a};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("agreement_mask", &agreement_mask_cpu);
}

}  // namespace fastdd
