#pragma once
// Deterministic two-pass sum used by fastdet's reduced losses on CUDA. Pass one: block b owns a fixed range of
// elements (the same kLossChunk chunking as the CPU kernels), each thread accumulates its strided share in order,
// then the block combines its threads in a fixed tree and writes partial[b]. Pass two: one block adds the partials in
// double, again in a fixed tree. No floating-point atomics anywhere, so a reduced loss has the same bits on every run
// (and does not depend on the GPU model: the chunking depends only on the size).
#include <torch/headeronly/macros/Macros.h>

namespace fastdet {
namespace cuda_reduce {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Sum of v over the block, valid in thread 0 (fixed order: shuffle-down within warps, then warp 0 over the warps).
template <typename A>
__device__ inline A block_sum(A v) {
  __shared__ A warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

// out[0] = (sum of partial[0..n)) * scale, with scale = *scale_ptr when given, else scale_host. One block.
template <typename out_t, typename A>
__global__ void finish_sum_kernel(const A* __restrict__ partial, int64_t n, const A* __restrict__ scale_ptr,
                                  double scale_host, out_t* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    acc += static_cast<double>(partial[i]);
  }
  const double total = block_sum<double>(acc);
  if (threadIdx.x == 0) {
    const double s = scale_ptr != nullptr ? static_cast<double>(*scale_ptr) : scale_host;
    out[0] = static_cast<out_t>(total * s);
  }
}

}  // namespace cuda_reduce
}  // namespace fastdet
