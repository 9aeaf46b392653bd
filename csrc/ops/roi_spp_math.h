#pragma once
// RoI spatial pyramid pooling (SPP-Net) math shared by the CPU and CUDA kernels. The bin geometry is roi_pool's
// (roi_pool.h): every pyramid level l is an l x l roi_pool of the same box, so the kernels call roi::pool_geometry and
// roi::pool_bin_range per level and the result equals roi_pool's bit for bit.
//
// Layout (decided here, once): with B = sum(l * l) bins over the levels and off_j = sum of l_i * l_i for i < j,
//   output [K, C * B]: element (k, c, level j, ph, pw) sits at column off_j * C + c * l_j * l_j + ph * l_j + pw
//     (levels one after another; inside a level channel-major, then the level's bins in row-major order), i.e.
//     torch.cat([roi_pool(x, boxes, (l, l)).flatten(1) for l in levels], 1);
//   argmax [K, C, B] int32: for bin b = off_j + ph * l_j + pw, the index h * W + w of the maximum in its feature plane,
//     -1 for an empty bin (or one whose values are all NaN / <= -FLT_MAX).
#include <torch/headeronly/macros/Macros.h>

#include <cstdint>

#include "ops/roi_pool.h"

namespace fastdet {
namespace spp {

// Bounds on the pyramid (checked by the schema file roi_spp.cpp): the levels travel to the CUDA kernel by value.
constexpr int64_t kMaxLevels = 16;
constexpr int64_t kMaxBins = 4096;  // sum(l * l): the output has C * kMaxBins columns at most (a 64 x 64 level)

struct Levels {
  int32_t count;
  int32_t size[kMaxLevels];
  int32_t offset[kMaxLevels + 1];  // offset[j] = first bin of level j; offset[count] = total bins B
};

// Level j and row-major bin (ph, pw) of output column `col` (in [0, C * B)) of a RoI.
C10_HOST_DEVICE inline void locate_column(const Levels& lv, int64_t C, int64_t col, int64_t* level, int64_t* c,
                                          int64_t* ph, int64_t* pw) {
  int64_t j = 0;
  while (j + 1 < lv.count && col >= static_cast<int64_t>(lv.offset[j + 1]) * C) {
    ++j;
  }
  const int64_t l = lv.size[j];
  const int64_t local = col - static_cast<int64_t>(lv.offset[j]) * C;
  *level = j;
  *c = local / (l * l);
  *ph = (local % (l * l)) / l;
  *pw = local % l;
}

// Running maximum of one bin [h0, h1) x [w0, w1) of a feature plane read through strides (ish, isw), updating
// (*best, *where) as roi_pool does: a value wins only if it is strictly greater (NaN never wins, ties keep the first
// pixel in row-major order). Selects rather than branches: bins hold a handful of pixels.
template <typename scalar_t, typename T>
C10_HOST_DEVICE inline void bin_max(const scalar_t* plane, int64_t ish, int64_t isw, int64_t W, int64_t h0,
                                    int64_t h1, int64_t w0, int64_t w1, T* best, int32_t* where) {
  T top = *best;
  int32_t at = *where;
  for (int64_t h = h0; h < h1; ++h) {
    const scalar_t* line = plane + h * ish;
    const int32_t row = static_cast<int32_t>(h * W);
    for (int64_t w = w0; w < w1; ++w) {
      const T v = static_cast<T>(line[w * isw]);
      const bool better = v > top;
      top = better ? v : top;
      at = better ? row + static_cast<int32_t>(w) : at;
    }
  }
  *best = top;
  *where = at;
}

}  // namespace spp
}  // namespace fastdet
