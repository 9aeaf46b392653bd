// What the CPU RoI kernels (roi_align, roi_pool, roi_spp) share: how much work one parallel task takes, and the batch
// index of every RoI.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/roi_align.h"
#include "ops/roi_align_math.h"

namespace fastdet {
namespace roi_cpu {

// Tasks smaller than this many (channel x bin) cells are grouped, so tiny calls (gradcheck, single RoIs) run on one
// thread instead of paying for waking the pool -- which on a busy machine can cost milliseconds per call.
constexpr int64_t kMinCellsPerTask = 16384;

inline int64_t grain_for(int64_t cells_per_item) {
  return std::max<int64_t>(1, kMinCellsPerTask / std::max<int64_t>(cells_per_item, 1));
}

// The forward kernels' tasks are (RoI, block of channels) pairs; these map a task number to the pair. Planar (NCHW)
// maps are done block by block, every RoI within a block: one block's planes (16 x H x W values, ~220 KB at 50 x 68
// float32) stay in cache while the RoIs read them, where RoI by RoI each RoI's rows would be fetched again from all C
// planes (1.3-1.8x faster measured on 512 detector RoIs of a 256 x 50 x 68 map). Channels-last maps go RoI by RoI: a
// pixel's channels share cache lines, so one RoI's blocks are best done together.
inline int64_t task_roi(int64_t task, int64_t K, int64_t blocks, bool planar) {
  return planar ? task % K : task / blocks;
}
inline int64_t task_block(int64_t task, int64_t K, int64_t blocks, bool planar) {
  return planar ? task / K : task % blocks;
}

// Channels-last max pooling: one pixel's channels c0 .. c0 + n (n <= kN, contiguous at px) into the running maxima
// best / where of a channel block, as roi::pool_bin_max (strictly greater wins, branch-free). A full block runs a loop
// of constant length, which the compiler vectorises.
template <typename scalar_t, typename T>
inline void pool_pixel_channel(const scalar_t* px, int32_t idx, int64_t c, T* best, int32_t* where) {
  const T v = static_cast<T>(px[c]);
  const T b = best[c];
  const int32_t better = -static_cast<int32_t>(v > b);  // all ones where v wins (never for NaN)
  best[c] = b < v ? v : b;
  where[c] = (idx & better) | (where[c] & ~better);
}

template <int64_t kN, typename scalar_t, typename T>
inline void pool_pixel(const scalar_t* px, int32_t idx, int64_t n, T* best, int32_t* where) {
  if (n == kN) {
    for (int64_t c = 0; c < kN; ++c) pool_pixel_channel(px, idx, c, best, where);
  } else {
    for (int64_t c = 0; c < n; ++c) pool_pixel_channel(px, idx, c, best, where);
  }
}

// Batch index of every RoI; -1 where it is not in [0, N), which the kernels treat like a non-finite box: the RoI
// pools to 0 and passes no gradient. The schema files reject such RoIs with a clear error for the public ops, so
// this only keeps a direct call of a private kernel op in bounds.
inline std::vector<int64_t> batch_indices(const Tensor& rois, int64_t N) {
  const int64_t K = rois.size(0);
  std::vector<int64_t> batch(K);
  FASTDET_DISPATCH_FLOAT_DOUBLE(rois.scalar_type(), "roi_batch_index", [&] {
    const auto* r = rois.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      batch[k] = roi::batch_index(r[k * 5], N);
    }
  });
  return batch;
}

// The RoIs of each image in index order (a stable counting sort): those of image n are order[first[n]] ..
// order[first[n + 1] - 1]. RoIs whose batch index is negative are left out (order keeps K entries; the tail is unused).
struct RoisByImage {
  std::vector<int64_t> first, order;
};

inline RoisByImage rois_by_image(const std::vector<int64_t>& batch, int64_t N) {
  const int64_t K = static_cast<int64_t>(batch.size());
  RoisByImage out{std::vector<int64_t>(N + 1, 0), std::vector<int64_t>(K)};
  for (int64_t k = 0; k < K; ++k) {
    if (batch[k] >= 0) ++out.first[batch[k] + 1];
  }
  for (int64_t n = 0; n < N; ++n) out.first[n + 1] += out.first[n];
  std::vector<int64_t> fill(out.first.begin(), out.first.end() - 1);
  for (int64_t k = 0; k < K; ++k) {
    if (batch[k] >= 0) out.order[fill[batch[k]]++] = k;
  }
  return out;
}

}  // namespace roi_cpu
}  // namespace fastdet
