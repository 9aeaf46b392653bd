#pragma once
// The greedy scan shared by the CUDA NMS kernels (axis-aligned and rotated): given one segment's suppression bit mask
// (row i, word w: bit k set when candidate i suppresses candidate 64 w + k, only for later candidates), walk it 64
// candidates at a time and write the keep flags. One thread block per segment; the caller owns the shared memory.
#include <cstdint>

namespace fastdet {
namespace nms {

constexpr int kMaskBits = 64;

// Candidates of `block` (64 per block) that exist in a segment of `count`.
__device__ __forceinline__ int mask_block_extent(int64_t count, int64_t block) {
  const int64_t left = count - block * kMaskBits;
  return static_cast<int>(left < kMaskBits ? left : kMaskBits);
}

// mask: [count, words] of the segment; removed: [words], zero on entry; keep: [count] flags of the segment.
// diagonal (kMaskBits words) and kept_in_block live in the calling kernel's shared memory.
__device__ inline void scan_suppression_mask(const uint64_t* __restrict__ mask, int64_t count, int64_t words,
                                             uint64_t* __restrict__ removed, bool* __restrict__ keep,
                                             uint64_t* diagonal, uint64_t& kept_in_block) {
  for (int64_t block = 0; block < words; ++block) {
    const int rows = mask_block_extent(count, block);
    if (threadIdx.x < rows) {
      diagonal[threadIdx.x] = mask[(block * kMaskBits + threadIdx.x) * words + block];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The sequential heart of greedy NMS, 64 candidates at a time, entirely in registers and shared memory.
      uint64_t gone = removed[block];
      uint64_t kept = 0;
      for (int k = 0; k < rows; ++k) {
        if (!((gone >> k) & 1ULL)) {
          kept |= 1ULL << k;
          gone |= diagonal[k];
        }
      }
      kept_in_block = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_in_block;
    if (threadIdx.x < rows) {
      keep[block * kMaskBits + threadIdx.x] = (kept >> threadIdx.x) & 1ULL;
    }
    // Each thread owns whole words of the removed bitmap, so there are no write conflicts.
    for (int64_t word = block + 1 + threadIdx.x; word < words; word += blockDim.x) {
      uint64_t acc = removed[word];
      uint64_t pending = kept;
      while (pending) {
        const int k = __ffsll(static_cast<long long>(pending)) - 1;
        pending &= pending - 1;
        acc |= mask[(block * kMaskBits + k) * words + word];
      }
      removed[word] = acc;
    }
    __syncthreads();  // removed[block + 1] and the shared arrays are read in the next round
  }
}

}  // namespace nms
}  // namespace fastdet
