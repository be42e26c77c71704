// CPU kernels for fastdd::norm_act_pool (instance norm + affine + ReLU + 2x2 avg pool) and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"

// Kernels are also cloned for AVX2+FMA (x86-64-v3) and picked at load time (GCC ifunc); the build's
// baseline flags only allow SSE2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTDD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTDD_CLONES
#endif
#if defined(__GNUC__) && !defined(__clang__)
// Lets GCC if-convert (and so vectorise) the ReLU-mask selects; FP exception flags are not observed.
#pragma GCC optimize("no-trapping-math")
#endif

namespace fastdd {
namespace {

// NCHW kernels work on one (n, c) plane at a time (it stays in L1/L2 between the passes); NHWC kernels
// on one sample with inner loops over the contiguous channels. Statistics: opmath sums over short runs
// (omp simd lanes) added into double, all shifted by the plane's first value against cancellation.

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                double eps, int64_t pool) {
  TORCH_CHECK_VALUE(pool == 2, op, ": pool must be 2 (2x2 average pooling, stride 2), got ", pool);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) >= pool && x.size(3) >= pool, op, ": x must be at least ", pool, "x", pool,
                    " spatially, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must have shape [",
                    x.size(1), "], got ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(1), op, ": bias must have shape [", x.size(1),
                    "], got ", bias.sizes());
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// The same rule as fastdd.reference.norm_act_pool.memory_format.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename acc_t>
inline void finish_stats(double s, double q, double shift, int64_t count, double eps, acc_t& mean, acc_t& rstd) {
  const double mu = s / count;
  const double var = std::max(q / count - mu * mu, 0.0);
  mean = static_cast<acc_t>(shift + mu);
  rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
}

template <typename scalar_t, typename acc_t>
FASTDD_CLONES void fwd_plane(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t H, int64_t W, double eps,
               acc_t w, acc_t b, acc_t& mean, acc_t& rstd) {
  const acc_t shift = static_cast<acc_t>(x[0]);
  double s = 0, q = 0;
  constexpr int64_t kChunk = 512;
  for (int64_t i0 = 0; i0 < H * W; i0 += kChunk) {
    const int64_t i1 = std::min(H * W, i0 + kChunk);
    acc_t rs = 0, rq = 0;
#pragma omp simd reduction(+ : rs, rq)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t d = static_cast<acc_t>(x[i]) - shift;
      rs += d;
      rq += d * d;
    }
    s += rs;
    q += rq;
  }
  finish_stats<acc_t>(s, q, shift, H * W, eps, mean, rstd);
  const acc_t a = rstd * w, sh = b - mean * a, zero = 0, quarter = 0.25;
  const int64_t Ho = H / 2, Wo = W / 2;
  for (int64_t i = 0; i < Ho; ++i) {
    const scalar_t* __restrict__ r0 = x + 2 * i * W;
    const scalar_t* __restrict__ r1 = r0 + W;
    scalar_t* __restrict__ o = out + i * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) {
      const acc_t v00 = static_cast<acc_t>(r0[2 * j]) * a + sh, v01 = static_cast<acc_t>(r0[2 * j + 1]) * a + sh;
      const acc_t v10 = static_cast<acc_t>(r1[2 * j]) * a + sh, v11 = static_cast<acc_t>(r1[2 * j + 1]) * a + sh;
      const acc_t t = (v00 < zero ? zero : v00) + (v01 < zero ? zero : v01) + (v10 < zero ? zero : v10) +
                      (v11 < zero ? zero : v11);
      o[j] = static_cast<scalar_t>(t * quarter);
    }
  }
}

// One sample [H, W, C]; s/q/shift/a/sh are caller-owned buffers of C entries.
template <typename scalar_t, typename acc_t>
FASTDD_CLONES void fwd_sample_cl(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t C, int64_t H, int64_t W,
                   double eps, const acc_t* __restrict__ w, const acc_t* __restrict__ b, acc_t* __restrict__ mean,
                   acc_t* __restrict__ rstd, double* __restrict__ s, double* __restrict__ q,
                   acc_t* __restrict__ shift, acc_t* __restrict__ rs, acc_t* __restrict__ rq) {
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t>(x[c]);
    s[c] = q[c] = 0;
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t c = 0; c < C; ++c) rs[c] = rq[c] = 0;
    for (int64_t wi = 0; wi < W; ++wi) {
      const scalar_t* __restrict__ px = x + (h * W + wi) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(px[c]) - shift[c];
        rs[c] += d;
        rq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s[c] += rs[c];
      q[c] += rq[c];
    }
  }
  // rs/rq now hold the affine scale/shift.
  acc_t* __restrict__ a = rs;
  acc_t* __restrict__ sh = rq;
  for (int64_t c = 0; c < C; ++c) {
    finish_stats<acc_t>(s[c], q[c], shift[c], H * W, eps, mean[c], rstd[c]);
    a[c] = rstd[c] * w[c];
    sh[c] = b[c] - mean[c] * a[c];
  }
  const int64_t Ho = H / 2, Wo = W / 2;
  const acc_t zero = 0, quarter = 0.25;
  for (int64_t i = 0; i < Ho; ++i) {
    for (int64_t j = 0; j < Wo; ++j) {
      const scalar_t* __restrict__ p00 = x + (2 * i * W + 2 * j) * C;
      const scalar_t* __restrict__ p01 = p00 + C;
      const scalar_t* __restrict__ p10 = p00 + W * C;
      const scalar_t* __restrict__ p11 = p10 + C;
      scalar_t* __restrict__ o = out + (i * Wo + j) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v00 = static_cast<acc_t>(p00[c]) * a[c] + sh[c], v01 = static_cast<acc_t>(p01[c]) * a[c] + sh[c];
        const acc_t v10 = static_cast<acc_t>(p10[c]) * a[c] + sh[c], v11 = static_cast<acc_t>(p11[c]) * a[c] + sh[c];
        const acc_t t = (v00 < zero ? zero : v00) + (v01 < zero ? zero : v01) + (v10 < zero ? zero : v10) +
                        (v11 < zero ? zero : v11);
        o[c] = static_cast<scalar_t>(t * quarter);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_pool_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double eps, int64_t pool) {
  check_args("norm_act_pool", x_in, weight, bias, eps, pool);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = H / 2, Wo = W / 2;
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options().memory_format(fmt));
  at::Tensor mean = at::empty({N, C}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N, C}, x.options().dtype(acc));
  if (N * C == 0) return {out, mean, rstd};
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_act_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const acc_t* bp = b.data_ptr<acc_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<double> s(C), q(C);
        std::vector<acc_t> shift(C), rs(C), rq(C);
        for (int64_t n = n0; n < n1; ++n)
          fwd_sample_cl<scalar_t, acc_t>(xp + n * H * W * C, op + n * Ho * Wo * C, C, H, W, eps, wp, bp, mp + n * C,
                                         rp + n * C, s.data(), q.data(), shift.data(), rs.data(), rq.data());
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, 16384 / (H * W));
      at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C;
          fwd_plane<scalar_t, acc_t>(xp + p * H * W, op + p * Ho * Wo, H, W, eps, wp[c], bp[c], mp[p], rp[p]);
        }
      });
    }
  });
  return {out, mean, rstd};
}

// dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)) = k * dy + P * x + Q, with dy = relu'(y) * grad / 4.
template <typename acc_t>
inline void dx_coeffs(double sum_dy, double sum_dyxhat, int64_t count, acc_t mean, acc_t rstd, acc_t k, acc_t& P,
                      acc_t& Q) {
  const double Pd = -static_cast<double>(k) * rstd * sum_dyxhat / count;
  P = static_cast<acc_t>(Pd);
  Q = static_cast<acc_t>(-static_cast<double>(k) * sum_dy / count - Pd * mean);
}

// `gq` is caller-owned scratch of H * W entries: grad/4 upsampled 2x, zero outside the pooled area, so
// both passes are flat loops over the plane (short rows would otherwise dominate for 7x7/8x8 maps).
template <typename scalar_t, typename acc_t>
FASTDD_CLONES void bwd_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ dx, int64_t H, int64_t W, acc_t w, acc_t b, acc_t mean,
                             acc_t rstd, acc_t& dw_part, acc_t& db_part, acc_t* __restrict__ gq) {
  const int64_t Ho = H / 2, Wo = W / 2, HW = H * W;
  const acc_t k = rstd * w, sh = b - mean * k, zero = 0, one = 1, quarter = 0.25;
  for (int64_t h = 0; h < H; ++h) {
    acc_t* __restrict__ row = gq + h * W;
    if (h < 2 * Ho) {
      const scalar_t* __restrict__ gi = g + (h / 2) * Wo;
      for (int64_t j = 0; j < Wo; ++j) row[2 * j] = row[2 * j + 1] = static_cast<acc_t>(gi[j]) * quarter;
      for (int64_t i = 2 * Wo; i < W; ++i) row[i] = 0;
    } else {
      for (int64_t i = 0; i < W; ++i) row[i] = 0;
    }
  }
  double sdy = 0, sdyx = 0;
  constexpr int64_t kChunk = 512;
  for (int64_t i0 = 0; i0 < HW; i0 += kChunk) {
    const int64_t i1 = std::min(HW, i0 + kChunk);
    acc_t a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t dy = (xv * k + sh > zero ? one : zero) * gq[i];
      a1 += dy;
      a2 += dy * (xv - mean);
    }
    sdy += a1;
    sdyx += a2;
  }
  const double sdyxhat = sdyx * rstd;
  db_part = static_cast<acc_t>(sdy);
  dw_part = static_cast<acc_t>(sdyxhat);
  acc_t P, Q;
  dx_coeffs<acc_t>(sdy, sdyxhat, HW, mean, rstd, k, P, Q);
#pragma omp simd
  for (int64_t i = 0; i < HW; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    dx[i] = static_cast<scalar_t>((xv * k + sh > zero ? one : zero) * k * gq[i] + P * xv + Q);
  }
}

// One sample [H, W, C]; buf holds 8 * C acc_t entries of scratch.
template <typename scalar_t, typename acc_t>
FASTDD_CLONES void bwd_sample_cl(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                   int64_t C, int64_t H, int64_t W, const acc_t* __restrict__ w, const acc_t* __restrict__ b,
                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, acc_t* __restrict__ dw_part,
                   acc_t* __restrict__ db_part, double* __restrict__ s1, double* __restrict__ s2,
                   acc_t* __restrict__ buf) {
  const int64_t Ho = H / 2, Wo = W / 2;
  acc_t* __restrict__ k = buf;
  acc_t* __restrict__ sh = buf + C;
  acc_t* __restrict__ a1 = buf + 2 * C;
  acc_t* __restrict__ a2 = buf + 3 * C;
  acc_t* __restrict__ P = buf + 4 * C;
  acc_t* __restrict__ Q = buf + 5 * C;
  const acc_t zero = 0, one = 1, quarter = 0.25;
  for (int64_t c = 0; c < C; ++c) {
    k[c] = rstd[c] * w[c];
    sh[c] = b[c] - mean[c] * k[c];
    s1[c] = s2[c] = 0;
  }
  for (int64_t i = 0; i < Ho; ++i) {
    for (int64_t c = 0; c < C; ++c) a1[c] = a2[c] = 0;
    for (int64_t j = 0; j < Wo; ++j) {
      const scalar_t* __restrict__ gp = g + (i * Wo + j) * C;
      const scalar_t* __restrict__ p00 = x + (2 * i * W + 2 * j) * C;
      const scalar_t* __restrict__ p01 = p00 + C;
      const scalar_t* __restrict__ p10 = p00 + W * C;
      const scalar_t* __restrict__ p11 = p10 + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gq = static_cast<acc_t>(gp[c]) * quarter;
        const acc_t x00 = static_cast<acc_t>(p00[c]), x01 = static_cast<acc_t>(p01[c]);
        const acc_t x10 = static_cast<acc_t>(p10[c]), x11 = static_cast<acc_t>(p11[c]);
        const acc_t d00 = (x00 * k[c] + sh[c] > zero ? one : zero) * gq;
        const acc_t d01 = (x01 * k[c] + sh[c] > zero ? one : zero) * gq;
        const acc_t d10 = (x10 * k[c] + sh[c] > zero ? one : zero) * gq;
        const acc_t d11 = (x11 * k[c] + sh[c] > zero ? one : zero) * gq;
        a1[c] += d00 + d01 + d10 + d11;
        a2[c] += d00 * (x00 - mean[c]) + d01 * (x01 - mean[c]) + d10 * (x10 - mean[c]) + d11 * (x11 - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double sdyxhat = s2[c] * rstd[c];
    db_part[c] = static_cast<acc_t>(s1[c]);
    dw_part[c] = static_cast<acc_t>(sdyxhat);
    dx_coeffs<acc_t>(s1[c], sdyxhat, H * W, mean[c], rstd[c], k[c], P[c], Q[c]);
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t wi = 0; wi < W; ++wi) {
      const scalar_t* __restrict__ px = x + (h * W + wi) * C;
      scalar_t* __restrict__ po = dx + (h * W + wi) * C;
      if (h / 2 < Ho && wi / 2 < Wo) {
        const scalar_t* __restrict__ gp = g + ((h / 2) * Wo + wi / 2) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(px[c]), kg = k[c] * static_cast<acc_t>(gp[c]) * quarter;
          po[c] = static_cast<scalar_t>((xv * k[c] + sh[c] > zero ? one : zero) * kg + P[c] * xv + Q[c]);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) po[c] = static_cast<scalar_t>(P[c] * static_cast<acc_t>(px[c]) + Q[c]);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_pool_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, double eps, int64_t pool) {
  check_args("norm_act_pool_backward", x_in, weight, bias, eps, pool);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = H / 2, Wo = W / 2;
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == C && grad_in.size(2) == Ho &&
                        grad_in.size(3) == Wo,
                    "norm_act_pool_backward: grad must have shape [", N, ", ", C, ", ", Ho, ", ", Wo, "], got ",
                    grad_in.sizes());
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor g = grad_in.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x, x.options().memory_format(fmt));
  at::Tensor dw = at::zeros({N, C}, x.options().dtype(acc));
  at::Tensor db = at::zeros({N, C}, x.options().dtype(acc));
  if (N * C > 0) {
    const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_act_pool_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      const acc_t* wp = w.data_ptr<acc_t>();
      const acc_t* bp = b.data_ptr<acc_t>();
      const acc_t* mp = mean.data_ptr<acc_t>();
      const acc_t* rp = rstd.data_ptr<acc_t>();
      acc_t* dwp = dw.data_ptr<acc_t>();
      acc_t* dbp = db.data_ptr<acc_t>();
      if (fmt == at::MemoryFormat::ChannelsLast) {
        at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
          std::vector<double> s1(C), s2(C);
          std::vector<acc_t> buf(8 * C);
          for (int64_t n = n0; n < n1; ++n)
            bwd_sample_cl<scalar_t, acc_t>(gp + n * Ho * Wo * C, xp + n * H * W * C, dxp + n * H * W * C, C, H, W,
                                           wp, bp, mp + n * C, rp + n * C, dwp + n * C, dbp + n * C, s1.data(),
                                           s2.data(), buf.data());
        });
      } else {
        const int64_t grain = std::max<int64_t>(1, 16384 / (H * W));
        at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
          std::vector<acc_t> gq(H * W);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t c = p % C;
            bwd_plane<scalar_t, acc_t>(gp + p * Ho * Wo, xp + p * H * W, dxp + p * H * W, H, W, wp[c], bp[c], mp[p],
                                       rp[p], dwp[p], dbp[p], gq.data());
          }
        });
      }
    });
  }
  return {dx, dw.sum(0).to(weight.scalar_type()), db.sum(0).to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("norm_act_pool", &norm_act_pool_cpu);
  m.impl("norm_act_pool_backward", &norm_act_pool_backward_cpu);
}

}  // namespace fastdd
