// CUDA keep-flag kernel of the rotated NMS family, with the bit-mask design of nms.cu and no host synchronisation:
//   1. rotated_mask_kernel: for every row r of an image and every block of 64 later candidates, a 64-bit word whose
//      bit k says "r suppresses candidate 64 * block + k" (same category and rotated::iou(r, candidate) > threshold,
//      the pair order of the CPU kernel). One CUDA block computes one 64 x 64 tile.
//   2. rotated_scan_kernel: one CUDA block per image walks the rows in visit order, 64 at a time on one thread with
//      the tile's diagonal words in shared memory; the kept rows' words are OR-ed into the image's "removed" bitmap by
//      all threads, one word each.
// Categories are tested inside the mask kernel, so each image is one dense segment: N^2 / 8 bytes of mask per image.
#include <algorithm>
#include <cstdint>
#include <optional>

#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/nms_scan.cuh"
#include "ops/nms_math.h"
#include "ops/rotated.h"
#include "ops/rotated_math.h"

namespace fastdet {
namespace {

constexpr int kBits = nms::kMaskBits;
constexpr int kScanThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T>
__global__ void rotated_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ categories, int64_t B,
                                    int64_t N, T threshold, uint64_t* __restrict__ mask) {
  __shared__ rotated::Rect<T> cols[kBits];
  __shared__ int64_t col_category[kBits];
  const int64_t words = (N + kBits - 1) / kBits;
  const int64_t total = B * words * words;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t image = tile / (words * words);
    const int64_t local = tile % (words * words);
    const int64_t row_block = local / words;
    const int64_t col_block = local % words;
    if (col_block < row_block) continue;  // below the diagonal: never read by the scan (uniform across the block)
    const int rows = nms::mask_block_extent(N, row_block);
    const int ncols = nms::mask_block_extent(N, col_block);
    __syncthreads();  // the previous tile's readers are done with the shared arrays
    if (threadIdx.x < ncols) {
      const int64_t j = image * N + col_block * kBits + threadIdx.x;
      const T* p = boxes + 5 * j;
      cols[threadIdx.x] = rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
      col_category[threadIdx.x] = categories != nullptr ? categories[j] : 0;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      const int64_t local_row = row_block * kBits + threadIdx.x;
      const int64_t i = image * N + local_row;
      const T* p = boxes + 5 * i;
      const auto row = rotated::make_rect<T>(p[0], p[1], p[2], p[3], p[4]);
      const int64_t category = categories != nullptr ? categories[i] : 0;
      uint64_t bits = 0;
      const int first = row_block == col_block ? threadIdx.x + 1 : 0;  // only later candidates can be suppressed
      for (int k = first; k < ncols; ++k) {
        // A NaN IoU never suppresses.
        if (col_category[k] == category && rotated::iou<T>(row, cols[k]) > threshold) bits |= 1ULL << k;
      }
      mask[(image * N + local_row) * words + col_block] = bits;
    }
  }
}

__global__ void rotated_scan_kernel(const uint64_t* __restrict__ mask, int64_t B, int64_t N,
                                    uint64_t* __restrict__ removed_all, bool* __restrict__ keep) {
  __shared__ uint64_t diagonal[kBits];
  __shared__ uint64_t kept_in_block;
  const int64_t words = (N + kBits - 1) / kBits;
  for (int64_t image = blockIdx.x; image < B; image += gridDim.x) {
    nms::scan_suppression_mask(mask + image * N * words, N, words, removed_all + image * words, keep + image * N,
                               diagonal, kept_in_block);
  }
}

// boxes [B, N, 5] contiguous float32/float64 in visit order, categories [B, N] int64 contiguous and grouped, or None
// (prepared and checked by the composite in nms_rotated.cpp).
Tensor nms_rotated_keep_flags_cuda(const Tensor& boxes, const std::optional<Tensor>& categories,
                                   double iou_threshold) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto keep = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) {
    return keep;
  }
  const cudaStream_t stream = current_stream(boxes);
  const int64_t words = (N + kBits - 1) / kBits;
  auto mask = aten::empty({B * N * words}, kLong, boxes);
  auto removed = aten::zeros({B * words}, kLong, boxes);
  auto* mask_ptr = reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>());
  auto* removed_ptr = reinterpret_cast<uint64_t*>(removed.mutable_data_ptr<int64_t>());
  const int64_t* category_ptr = categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr;
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "_nms_rotated_keep_flags", [&] {
    const scalar_t threshold = std::is_same_v<scalar_t, double>
                                   ? static_cast<scalar_t>(iou_threshold)
                                   : static_cast<scalar_t>(nms::threshold_as_float(iou_threshold));
    const auto grid = static_cast<unsigned int>(std::min<int64_t>(B * words * words, kMaxBlocks));
    rotated_mask_kernel<scalar_t><<<grid, kBits, 0, stream>>>(boxes.const_data_ptr<scalar_t>(), category_ptr, B, N,
                                                              threshold, mask_ptr);
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  const auto scan_grid = static_cast<unsigned int>(std::min<int64_t>(B, kMaxBlocks));
  rotated_scan_kernel<<<scan_grid, kScanThreads, 0, stream>>>(mask_ptr, B, N, removed_ptr,
                                                              keep.mutable_data_ptr<bool>());
  FASTDET_CUDA_LAUNCH_CHECK();
  return keep;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_nms_rotated_keep_flags", TORCH_BOX(&fastdet::nms_rotated_keep_flags_cuda));
}
