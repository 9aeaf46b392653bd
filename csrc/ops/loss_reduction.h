#pragma once
// The reduction argument shared by fastdet's loss ops. The Python wrappers map 'none' / 'mean' / 'sum' to these.
#include <cstdint>

#include "ops/stable.h"

namespace fastdet {

enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

inline void check_reduction(int64_t reduction) {
  FASTDET_CHECK(reduction >= kReduceNone && reduction <= kReduceSum,
                "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Reduced losses are summed in fixed chunks of this many elements: one partial sum per chunk, each accumulated in a
// fixed order, then the partials added in index order in double. The chunking depends only on the size, not on the
// number of threads or the GPU, so a reduced loss is bitwise reproducible run to run on a given backend.
constexpr int64_t kLossChunk = 8192;

}  // namespace fastdet
