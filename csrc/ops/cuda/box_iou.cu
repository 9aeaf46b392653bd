// CUDA kernels of the pairwise IoU family (IoU, GIoU, DIoU, CIoU). Every pair is evaluated by the same
// iou::pair_forward / iou::pair_backward as the CPU kernel, in the accumulation dtype (float or double).
//
// Forward: the [B, N, M] output is the only large array, so the kernel is organised around writing it: threads along
// x own consecutive columns j (coalesced stores), each keeps its boxes2 box in registers, and a tile of boxes1 rows is
// staged in shared memory and read as broadcasts. Batches, row tiles and column tiles are grid-stride loops, so grids
// stay within the hardware limits (gridDim.y/z <= 65535) for any size, and all offsets are 64-bit.
//
// Backward: grad_boxes1[b, i] = sum_j d f(a_i, b_j) / d a_i * grad[b, i, j] and symmetrically for grad_boxes2. Each
// output box is reduced by one fixed group of threads in a fixed order (warp shuffles / shared memory), so the result
// is bitwise reproducible from run to run and needs no atomics. The summation order differs from the CPU kernel's
// sequential loop, so the two backends agree to rounding, not bitwise.
#include <cstdint>
#include <limits>
#include <tuple>

#include "ops/box_iou.h"
#include "ops/box_iou_math.h"
#include "ops/cuda/cuda_utils.cuh"

namespace fastdet {
namespace {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;

// Forward block: kForwardThreads threads shaped (tx, ty) with tx >= 32 columns and ty rows in flight; a block tile
// covers tx columns and kForwardRows rows, so each thread evaluates kForwardRows / ty pairs with one boxes2 load.
constexpr int kForwardThreads = 256;
constexpr int kForwardRows = 32;

// Backward blocks: kBackwardWarps warps of 32 threads.
constexpr int kBackwardWarps = 8;
static_assert(kBackwardWarps >= 4, "the column reduction uses one warp per box coordinate");

template <typename T>
__host__ __device__ inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__device__ inline iou::Box<T> load_box(const T* p) {
  return iou::Box<T>{p[0], p[1], p[2], p[3]};
}

template <typename T>
__global__ void pairwise_forward_kernel(const T* __restrict__ boxes1, const T* __restrict__ boxes2,
                                        T* __restrict__ out, int64_t B, int64_t N, int64_t M, int64_t variant,
                                        T eps) {
  __shared__ T rows[kForwardRows * 4];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int64_t col_tiles = ceil_div<int64_t>(M, blockDim.x);
  const int64_t row_tiles = ceil_div<int64_t>(N, kForwardRows);
  // The loop bounds depend only on block indices, so every thread of the block reaches every __syncthreads().
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
      const int64_t j = ct * blockDim.x + threadIdx.x;
      const bool active = j < M;
      // Consecutive threads load consecutive boxes: the four loads of a warp cover one contiguous 16*32-byte span.
      const iou::Box<T> bj = active ? load_box(boxes2 + (b * M + j) * 4) : iou::Box<T>{T(0), T(0), T(0), T(0)};
      for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
        const int64_t i0 = rt * kForwardRows;
        const int rows_here = static_cast<int>(N - i0 < kForwardRows ? N - i0 : kForwardRows);
        __syncthreads();  // the previous tile's rows are no longer read
        const T* src = boxes1 + (b * N + i0) * 4;
        for (int e = tid; e < rows_here * 4; e += nthreads) {
          rows[e] = src[e];
        }
        __syncthreads();
        if (active) {
          T* dst = out + (b * N + i0) * M + j;
          for (int r = threadIdx.y; r < rows_here; r += blockDim.y) {
            const iou::Box<T> a{rows[4 * r], rows[4 * r + 1], rows[4 * r + 2], rows[4 * r + 3]};
            dst[r * M] = iou::pair_forward<T>(a, bj, variant, eps);
          }
        }
      }
    }
  }
}

// grad_boxes1: one warp per row (b, i). Lane l sums the columns j = l, l + 32, ... in increasing order, so the grad
// row is read coalesced; the 32 partial sums are then combined by a xor butterfly. Addition is commutative, so both
// partners of every butterfly step compute the same bits and all lanes end with the identical total.
template <typename T>
__global__ void pairwise_backward_rows_kernel(const T* __restrict__ grad, const T* __restrict__ boxes1,
                                              const T* __restrict__ boxes2, T* __restrict__ grad1, int64_t B,
                                              int64_t N, int64_t M, int64_t variant, T eps) {
  const int lane = threadIdx.x;
  const int64_t total_rows = B * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < total_rows; row += stride) {
    const int64_t b = row / N;  // one 64-bit division per row, not per pair
    const iou::Box<T> a = load_box(boxes1 + row * 4);
    const T* grad_row = grad + row * M;
    const T* cols = boxes2 + b * M * 4;
    T acc[4] = {T(0), T(0), T(0), T(0)};
    for (int64_t j = lane; j < M; j += kWarpSize) {
      const T g = grad_row[j];
      if (g == T(0)) {
        continue;  // exact: every term is linear in g (as in the CPU kernel, which skips the same terms)
      }
      T ga[4], gb[4];
      iou::pair_backward<T>(a, load_box(cols + j * 4), variant, eps, g, ga, gb);
      for (int k = 0; k < 4; ++k) {
        acc[k] += ga[k];
      }
    }
    // row is uniform across the warp, so all 32 lanes take part in every shuffle.
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      for (int k = 0; k < 4; ++k) {
        acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], offset);
      }
    }
    if (lane < 4) {
      // Select without indexing acc by a runtime value, which would move it to local memory.
      const T v = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
      grad1[row * 4 + lane] = v;
    }
  }
}

// grad_boxes2: a (32, kBackwardWarps) block owns 32 consecutive columns of one batch; thread (x, y) sums rows
// i = y, y + kBackwardWarps, ... of column x in increasing order, so each warp reads a coalesced 32-wide slice of one
// grad row and one broadcast boxes1 box. The kBackwardWarps partial sums of a column are then added in warp order
// through shared memory.
template <typename T>
__global__ void pairwise_backward_cols_kernel(const T* __restrict__ grad, const T* __restrict__ boxes1,
                                              const T* __restrict__ boxes2, T* __restrict__ grad2, int64_t B,
                                              int64_t N, int64_t M, int64_t variant, T eps) {
  __shared__ T partial[kBackwardWarps][4][kWarpSize];
  const int64_t col_tiles = ceil_div<int64_t>(M, kWarpSize);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
      const int64_t j = ct * kWarpSize + threadIdx.x;
      const bool active = j < M;
      T acc[4] = {T(0), T(0), T(0), T(0)};
      if (active) {
        const iou::Box<T> bx = load_box(boxes2 + (b * M + j) * 4);
        const T* grad_col = grad + b * N * M + j;
        const T* rows = boxes1 + b * N * 4;
        for (int64_t i = threadIdx.y; i < N; i += kBackwardWarps) {
          const T g = grad_col[i * M];
          if (g == T(0)) {
            continue;
          }
          T ga[4], gb[4];
          iou::pair_backward<T>(load_box(rows + i * 4), bx, variant, eps, g, ga, gb);
          for (int k = 0; k < 4; ++k) {
            acc[k] += gb[k];
          }
        }
      }
      __syncthreads();  // the previous tile's partial sums have been read
      for (int k = 0; k < 4; ++k) {
        partial[threadIdx.y][k][threadIdx.x] = acc[k];
      }
      __syncthreads();
      if (active && threadIdx.y < 4) {
        const int k = threadIdx.y;
        T sum = partial[0][k][threadIdx.x];
        for (int w = 1; w < kBackwardWarps; ++w) {
          sum += partial[w][k][threadIdx.x];
        }
        grad2[(b * M + j) * 4 + k] = sum;
      }
    }
  }
}

// Blocks along one grid dimension: the kernels loop over whatever does not fit under the hardware limit.
unsigned int grid_dim(int64_t wanted, int64_t limit) {
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted > limit ? limit : wanted));
}

Tensor pairwise_box_iou_kernel(const Tensor& boxes1, const Tensor& boxes2, int64_t variant, double eps) {
  const DeviceGuard device_guard(boxes1.get_device_index());
  const cudaStream_t stream = current_stream(boxes1);

  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  auto out = aten::empty({B, N, M}, boxes1.scalar_type(), boxes1);
  if (out.numel() == 0) {
    return out;
  }

  // Columns per block: the smallest warp multiple covering M (up to the whole block), so narrow matrices do not
  // leave most lanes idle; the remaining threads work on further rows, but not on more rows than exist.
  int tx = kWarpSize;
  while (tx < kForwardThreads && tx < M) {
    tx *= 2;
  }
  int ty = kForwardThreads / tx;
  while (ty > 1 && ty > N) {
    ty /= 2;
  }
  const dim3 block(tx, ty);
  const dim3 grid(grid_dim(ceil_div<int64_t>(M, tx), kMaxGridX),
                  grid_dim(ceil_div<int64_t>(N, kForwardRows), kMaxGridYZ), grid_dim(B, kMaxGridYZ));

  FASTDET_DISPATCH_FLOAT_DOUBLE(out.scalar_type(), "pairwise_box_iou", [&] {
    pairwise_forward_kernel<scalar_t><<<grid, block, 0, stream>>>(
        boxes1.const_data_ptr<scalar_t>(), boxes2.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, N,
        M, variant, static_cast<scalar_t>(eps));
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> pairwise_box_iou_backward_kernel(const Tensor& grad, const Tensor& boxes1,
                                                            const Tensor& boxes2, int64_t variant, double eps) {
  const DeviceGuard device_guard(boxes1.get_device_index());
  const cudaStream_t stream = current_stream(boxes1);
  const int64_t B = boxes1.size(0), N = boxes1.size(1), M = boxes2.size(1);
  if (B == 0 || N == 0 || M == 0) {
    // An empty sum: the gradient of every box that exists is zero.
    return {aten::zeros_like(boxes1), aten::zeros_like(boxes2)};
  }
  auto g1 = aten::empty_like(boxes1);
  auto g2 = aten::empty_like(boxes2);
  const dim3 block(kWarpSize, kBackwardWarps);
  const dim3 rows_grid(grid_dim(ceil_div<int64_t>(B * N, kBackwardWarps), kMaxGridX));
  const dim3 cols_grid(grid_dim(ceil_div<int64_t>(M, kWarpSize), kMaxGridX), grid_dim(B, kMaxGridYZ));
  FASTDET_DISPATCH_FLOAT_DOUBLE(g1.scalar_type(), "_pairwise_box_iou_backward", [&] {
    const auto* grad_ptr = grad.const_data_ptr<scalar_t>();
    const auto* b1_ptr = boxes1.const_data_ptr<scalar_t>();
    const auto* b2_ptr = boxes2.const_data_ptr<scalar_t>();
    const auto eps_t = static_cast<scalar_t>(eps);
    pairwise_backward_rows_kernel<scalar_t><<<rows_grid, block, 0, stream>>>(
        grad_ptr, b1_ptr, b2_ptr, g1.mutable_data_ptr<scalar_t>(), B, N, M, variant, eps_t);
    FASTDET_CUDA_LAUNCH_CHECK();
    pairwise_backward_cols_kernel<scalar_t><<<cols_grid, block, 0, stream>>>(
        grad_ptr, b1_ptr, b2_ptr, g2.mutable_data_ptr<scalar_t>(), B, N, M, variant, eps_t);
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  return {g1, g2};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_pairwise_box_iou_kernel", TORCH_BOX(&fastdet::pairwise_box_iou_kernel));
  m.impl("_pairwise_box_iou_backward_kernel", TORCH_BOX(&fastdet::pairwise_box_iou_backward_kernel));
}
