#pragma once
// RoI spatial pyramid pooling (SPP-Net) math shared by the CPU and CUDA kernels. The bin geometry is roi_pool's
// (roi_pool.h): every pyramid level l is an l x l roi_pool of the same box, so the kernels call roi::pool_geometry,
// roi::pool_bin_range and roi::pool_bin_max per level and the result equals roi_pool's bit for bit. This header holds
// what is SPP's own: the level table and the output layout.
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

}  // namespace spp
}  // namespace fastdet
