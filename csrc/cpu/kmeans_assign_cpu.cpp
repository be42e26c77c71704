// CPU kernel for fastdd::kmeans_assign: nearest centroid of each row (within its segment) and the exact sqdist.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/checks.h"

namespace fastdd {
namespace {

// Work is split into tiles of rows of one segment, sklearn-style: every thread runs its own (single-threaded)
// addmm for ||c||^2 - 2 x.c (the argmin ignores ||x||^2), then the argmin and the exact ||x - c||^2 of the
// winner while the tile is still in cache. One parallel region per call: alternating it with BLAS's own
// threading is what makes small GEMMs slow on loaded machines.
template <typename acc_t>
void argmin_tile(const acc_t* __restrict__ scores, const acc_t* __restrict__ xt, const acc_t* __restrict__ cents,
                 const int64_t* __restrict__ rows, int64_t row0, int64_t tn, int64_t k, int64_t D,
                 acc_t* __restrict__ best_v, int32_t* __restrict__ best_j,
                 int64_t* __restrict__ labels, acc_t* __restrict__ dist) {
  // scores is [k, tn] (centroid-major): the running minimum is a contiguous, vectorisable sweep over rows.
  for (int64_t i = 0; i < tn; ++i) {
    best_v[i] = scores[i];
    best_j[i] = 0;
  }
  for (int64_t j = 1; j < k; ++j) {
    const acc_t* __restrict__ sj = scores + j * tn;
    const int32_t jj = static_cast<int32_t>(j);
    for (int64_t i = 0; i < tn; ++i) {  // branch-free so it vectorises; strict <: ties keep the lowest index
      const acc_t v = sj[i], b = best_v[i];
      const int32_t mask = -static_cast<int32_t>(v < b);
      best_v[i] = v < b ? v : b;
      best_j[i] = (best_j[i] & ~mask) | (jj & mask);
    }
  }
  for (int64_t i = 0; i < tn; ++i) {
    const acc_t* __restrict__ xi = xt + i * D;
    const acc_t* __restrict__ ci = cents + best_j[i] * D;
    // Independent partial sums so the compiler can vectorise the reduction without -ffast-math.
    constexpr int64_t L = 16;
    acc_t part[L] = {};
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      for (int64_t q = 0; q < L; ++q) {
        const acc_t diff = xi[d + q] - ci[d + q];
        part[q] += diff * diff;
      }
    }
    for (; d < D; ++d) {
      const acc_t diff = xi[d] - ci[d];
      part[0] += diff * diff;
    }
    acc_t total = 0;
    for (int64_t q = 0; q < L; ++q) total += part[q];
    const int64_t r = rows ? rows[i] : row0 + i;
    labels[r] = best_j[i];
    dist[r] = total;
  }
}

int64_t tile_rows(int64_t N, int64_t D) {
  // ~512 KiB of x per tile (L2-resident for the distance recompute), and enough tiles for every thread.
  const int64_t threads = at::get_num_threads();
  int64_t t = std::min<int64_t>(1024, std::max<int64_t>((int64_t(1) << 17) / std::max<int64_t>(D, 1), 16));
  t = std::min<int64_t>(t, (N + 4 * threads - 1) / (4 * threads));
  return std::max<int64_t>(t, 8);
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x_in, const at::Tensor& c_in,
                                                      const std::optional<at::Tensor>& seg_in) {
  const bool segmented = seg_in.has_value();
  TORCH_CHECK_VALUE(x_in.dim() == 2, "kmeans_assign: x must be 2-D, got shape ", x_in.sizes());
  TORCH_CHECK_VALUE(c_in.dim() == (segmented ? 3 : 2), "kmeans_assign: centroids must be ",
                    segmented ? "3-D [S, k, D] when seg is given" : "2-D [K, D]", ", got shape ", c_in.sizes());
  TORCH_CHECK_VALUE(c_in.scalar_type() == x_in.scalar_type(), "kmeans_assign: centroids dtype ",
                    c_in.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const int64_t N = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK_VALUE(c_in.size(-1) == D, "kmeans_assign: centroids have ", c_in.size(-1), " features but x has ", D);
  const int64_t S = segmented ? c_in.size(0) : 1;
  const int64_t k = c_in.size(-2);
  if (segmented) {
    TORCH_CHECK_VALUE(seg_in->scalar_type() == at::kLong && seg_in->dim() == 1,
                      "kmeans_assign: seg must be 1-D int64, got ", seg_in->scalar_type(), " of shape ",
                      seg_in->sizes());
    TORCH_CHECK_VALUE(seg_in->size(0) == N, "kmeans_assign: seg has ", seg_in->size(0), " entries but x has ", N,
                      " rows");
  }
  at::Tensor labels = at::empty({N}, x_in.options().dtype(at::kLong));
  if (N == 0) return {at::empty({0}, x_in.options()), labels};
  TORCH_CHECK_VALUE(k > 0, "kmeans_assign: centroids must hold at least one centroid per segment, got shape ",
                    c_in.sizes());
  TORCH_CHECK_VALUE(k < (int64_t(1) << 31), "kmeans_assign: at most 2^31 - 1 centroids per segment, got ", k);
  const auto acc_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cents = c_in.to(acc_type).contiguous().view({S, k, D});
  const at::Tensor cnorm = cents.square().sum(-1);  // [S, k]
  at::Tensor dist = at::empty({N}, x_in.options().dtype(acc_type));
  const int64_t tile = tile_rows(N, D);

  // Segment s owns rows order[offsets[s] : offsets[s] + counts[s]] (order undefined: rows already grouped).
  // One serial scan of the ids gives the range check, the counts and whether the rows are grouped.
  at::Tensor order;
  at::Tensor counts = at::zeros({S}, x_in.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  if (segmented) {
    const at::Tensor seg = seg_in->contiguous();
    const int64_t* sp = seg.data_ptr<int64_t>();
    int64_t lo = sp[0], hi = sp[0];
    bool grouped = true;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t v = sp[i];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      if (i > 0 && v < sp[i - 1]) grouped = false;
      if (v >= 0 && v < S) ++cnt[v];
    }
    TORCH_CHECK_VALUE(lo >= 0 && hi < S, "kmeans_assign: seg ids must lie in [0, ", S, "), found values in [", lo,
                      ", ", hi, "]");
    if (!grouped) order = std::get<1>(at::sort(seg, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  } else {
    cnt[0] = N;
  }
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<int64_t> tile_seg, tile_pos;  // (segment, first position in segment-sorted order) per tile
  for (int64_t s = 0, offset = 0; s < S; offset += cp[s], ++s) {
    for (int64_t t0 = 0; t0 < cp[s]; t0 += tile) {
      tile_seg.push_back(s);
      tile_pos.push_back(offset + t0);
    }
  }
  std::vector<int64_t> seg_end(S);
  for (int64_t s = 0, offset = 0; s < S; ++s) seg_end[s] = (offset += cp[s]);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "kmeans_assign_cpu", [&] {
    int64_t* lp = labels.data_ptr<int64_t>();
    scalar_t* dp = dist.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(tile_seg.size()), 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> best_v(tile);
      std::vector<int32_t> best_j(tile);  // k < 2^31 is checked above
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = tile_seg[b], pos = tile_pos[b];
        const int64_t tn = std::min(tile, seg_end[s] - pos);
        const at::Tensor cs = cents.select(0, s);
        at::Tensor rows, xt;
        if (order.defined()) {
          rows = order.narrow(0, pos, tn);
          xt = x.index_select(0, rows);
        } else {
          xt = x.narrow(0, pos, tn);
        }
        xt = xt.to(acc_type).contiguous();
        // [k, tn] = ||c||^2 - 2 c.x^T: this orientation is the fast one for the usual skinny k.
        const at::Tensor scores = at::addmm(cnorm.select(0, s).unsqueeze(1), cs, xt.t(), /*beta=*/1, /*alpha=*/-2);
        argmin_tile<scalar_t>(scores.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                              rows.defined() ? rows.data_ptr<int64_t>() : nullptr, pos, tn, k, D,
                              best_v.data(), best_j.data(), lp, dp);
      }
    });
  });
  return {dist.to(x_in.scalar_type()), labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdd, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
}

}  // namespace fastdd
