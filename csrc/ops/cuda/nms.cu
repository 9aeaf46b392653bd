// CUDA keep-flag kernel of the NMS family.
//
// Two kernels, after the classic bit-mask design but with the sequential part kept on the device:
//   1. nms_mask_kernel: for every candidate row r of a segment and every block of 64 later candidates, a 64-bit word
//      whose bit k says "r suppresses candidate 64 * block + k". One CUDA block computes one 64 x 64 tile.
//   2. nms_scan_kernel: one CUDA block per segment walks the rows in visit order. Rows are resolved 64 at a time by a
//      single thread using the tile's diagonal words (in shared memory); the kept rows' words are then OR-ed into the
//      segment's "removed" bitmap by all threads, one word each. No mask ever travels to the host.
// A segment is a run of candidates of one category within one image. With sync_free=false and categories present,
// the segment table is built on the host (one device-to-host copy of the categories, allowed because the output of
// nms / batched_nms is data-sized anyway), so memory is the sum over categories of n^2 / 8 bytes. With sync_free=true,
// each image is one dense segment whose mask tests categories inside the kernel: N^2 / 8 bytes per image, no copies;
// above kDenseMaskMaxCandidates candidates with categories (SSD's 36,000 would need 162 MB per image), a third kernel
// runs each category segment's greedy scan in one block instead, in O(N) memory.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "ops/nms.h"
#include "ops/nms_math.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/nms_scan.cuh"

namespace fastdet {
namespace {

constexpr int kBlockBits = nms::kMaskBits;
constexpr int kScanThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

// Segment table columns (int64 each) for the category-segmented layout.
enum SegmentField { kImage = 0, kBegin, kCount, kWords, kMaskOffset, kRemovedOffset, kTileOffset, kFields };

struct Segment {
  int64_t flat_begin;      // position of the segment's first candidate in the flattened [B * N] arrays
  int64_t count;           // candidates in the segment
  int64_t words;           // 64-bit words per mask row = ceil(count / 64)
  int64_t mask_offset;     // first word of the segment's mask
  int64_t removed_offset;  // first word of the segment's removed bitmap
  int64_t tile_offset;     // first tile (64 x 64 block pair) of the segment
};

// Either a table of segments or, when table == nullptr, one dense segment per image of n_dense candidates.
struct SegmentSource {
  const int64_t* table;
  int64_t num_segments;
  int64_t n_dense;

  __device__ Segment get(int64_t s) const {
    if (table == nullptr) {
      const int64_t words = (n_dense + kBlockBits - 1) / kBlockBits;
      return {s * n_dense, n_dense, words, s * n_dense * words, s * words, s * words * words};
    }
    const int64_t* row = table + s * kFields;
    return {row[kImage] * n_dense + row[kBegin], row[kCount], row[kWords], row[kMaskOffset], row[kRemovedOffset],
            row[kTileOffset]};
  }

  // The segment owning a tile: direct for the dense layout, binary search over tile offsets otherwise.
  __device__ int64_t segment_of_tile(int64_t tile) const {
    if (table == nullptr) {
      const int64_t words = (n_dense + kBlockBits - 1) / kBlockBits;
      return tile / (words * words);
    }
    int64_t lo = 0, hi = num_segments - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid * kFields + kTileOffset] <= tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ boxes, const T* __restrict__ area,
                                const int64_t* __restrict__ categories, SegmentSource segments, int64_t total_tiles,
                                T threshold, uint64_t* __restrict__ mask) {
  __shared__ T col_box[kBlockBits][5];
  __shared__ int64_t col_category[kBlockBits];
  for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const Segment seg = segments.get(segments.segment_of_tile(tile));
    const int64_t local = tile - seg.tile_offset;
    const int64_t row_block = local / seg.words;
    const int64_t col_block = local % seg.words;
    if (col_block < row_block) {
      continue;  // below the diagonal: never read by the scan (uniform across the block)
    }
    const int rows = nms::mask_block_extent(seg.count, row_block);
    const int cols = nms::mask_block_extent(seg.count, col_block);
    __syncthreads();  // the previous tile's readers are done with the shared arrays
    if (threadIdx.x < cols) {
      const int64_t j = seg.flat_begin + col_block * kBlockBits + threadIdx.x;
      col_box[threadIdx.x][0] = boxes[4 * j + 0];
      col_box[threadIdx.x][1] = boxes[4 * j + 1];
      col_box[threadIdx.x][2] = boxes[4 * j + 2];
      col_box[threadIdx.x][3] = boxes[4 * j + 3];
      col_box[threadIdx.x][4] = area[j];
      col_category[threadIdx.x] = categories != nullptr ? categories[j] : 0;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      const int64_t local_row = row_block * kBlockBits + threadIdx.x;
      const int64_t i = seg.flat_begin + local_row;
      const T x1 = boxes[4 * i + 0], y1 = boxes[4 * i + 1], x2 = boxes[4 * i + 2], y2 = boxes[4 * i + 3];
      const T a = area[i];
      const int64_t category = categories != nullptr ? categories[i] : 0;
      uint64_t bits = 0;
      const int first = row_block == col_block ? threadIdx.x + 1 : 0;  // only later candidates can be suppressed
      for (int k = first; k < cols; ++k) {
        if (col_category[k] == category &&
            nms::iou_above<T>(x1, y1, x2, y2, a, col_box[k][0], col_box[k][1], col_box[k][2], col_box[k][3],
                              col_box[k][4], threshold)) {
          bits |= 1ULL << k;
        }
      }
      mask[seg.mask_offset + local_row * seg.words + col_block] = bits;
    }
  }
}

__global__ void nms_scan_kernel(const uint64_t* __restrict__ mask, SegmentSource segments,
                                uint64_t* __restrict__ removed_all, bool* __restrict__ keep) {
  __shared__ uint64_t diagonal[kBlockBits];
  __shared__ uint64_t kept_in_block;
  for (int64_t s = blockIdx.x; s < segments.num_segments; s += gridDim.x) {
    const Segment seg = segments.get(s);
    nms::scan_suppression_mask(mask + seg.mask_offset, seg.count, seg.words, removed_all + seg.removed_offset,
                               keep + seg.flat_begin, diagonal, kept_in_block);
  }
}

// Sync-free NMS with categories for large N, in O(N) memory: one block per category segment (found on the device: a
// block per position, only segment starts work) runs the greedy scan itself, testing each candidate against the
// segment's kept candidates in parallel. Used instead of the dense N x N mask when that mask would be large.
template <typename T>
__global__ void nms_segment_greedy_kernel(const T* __restrict__ boxes, const T* __restrict__ area,
                                          const int64_t* __restrict__ categories, int64_t B, int64_t N, T threshold,
                                          int64_t* __restrict__ kept_index, bool* __restrict__ keep) {
  __shared__ int64_t segment_end;
  __shared__ int64_t kept_count;
  for (int64_t start = blockIdx.x; start < B * N; start += gridDim.x) {
    const int64_t image = start / N, begin = start % N, base = image * N;
    const int64_t* cat = categories + base;
    if (begin != 0 && cat[begin] == cat[begin - 1]) continue;  // not a segment start (uniform across the block)
    if (threadIdx.x == 0) {
      int64_t end = begin + 1;
      while (end < N && cat[end] == cat[begin]) ++end;
      segment_end = end;
      kept_count = 0;
    }
    __syncthreads();
    int64_t* kept = kept_index + base + begin;  // the segment's own slice of the scratch
    for (int64_t i = base + begin; i < base + segment_end; ++i) {
      const T x1 = boxes[4 * i], y1 = boxes[4 * i + 1], x2 = boxes[4 * i + 2], y2 = boxes[4 * i + 3], a = area[i];
      const int64_t count = kept_count;
      int hit = 0;
      for (int64_t k = threadIdx.x; k < count && !hit; k += blockDim.x) {
        const int64_t j = kept[k];
        hit = nms::iou_above<T>(boxes[4 * j], boxes[4 * j + 1], boxes[4 * j + 2], boxes[4 * j + 3], area[j], x1, y1,
                                x2, y2, a, threshold);
      }
      const int suppressed = __syncthreads_or(hit);
      if (threadIdx.x == 0) {
        keep[i] = !suppressed;
        if (!suppressed) kept[kept_count++] = i;
      }
      __syncthreads();
    }
    __syncthreads();  // everyone is done with segment_end before thread 0 moves on
  }
}

// Above this many candidates per image, sync-free NMS with categories uses nms_segment_greedy_kernel (O(N) memory)
// instead of the dense mask (N * ceil(N / 64) * 8 bytes per image: 8 MiB at N = 8192, 162 MB at N = 36,000).
constexpr int64_t kDenseMaskMaxCandidates = 8192;

// boxes [B, N, 4] contiguous float32/float64 in visit order, categories [B, N] int64 contiguous and grouped, or None
// (prepared and checked by the composite in nms.cpp).
Tensor nms_keep_flags_cuda(const Tensor& boxes, const std::optional<Tensor>& categories, double iou_threshold,
                           bool sync_free) {
  const DeviceGuard device_guard(boxes.get_device_index());
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto keep = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) {
    return keep;
  }
  const cudaStream_t stream = current_stream(boxes);
  // Areas come from separate elementwise kernels (no fused multiply-add), so they are bitwise equal to the CPU's.
  auto width = torch::stable::subtract(aten::select(boxes, 2, 2), aten::select(boxes, 2, 0));
  auto height = torch::stable::subtract(aten::select(boxes, 2, 3), aten::select(boxes, 2, 1));
  auto area = aten::contiguous(aten::mul(width, height));

  if (categories.has_value() && sync_free && N > kDenseMaskMaxCandidates) {
    auto kept_index = aten::empty({B * N}, kLong, boxes);
    FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "_nms_keep_flags", [&] {
      const scalar_t threshold = std::is_same_v<scalar_t, double>
                                     ? static_cast<scalar_t>(iou_threshold)
                                     : static_cast<scalar_t>(nms::threshold_as_float(iou_threshold));
      const auto grid = static_cast<unsigned int>(std::min<int64_t>(B * N, kMaxBlocks));
      nms_segment_greedy_kernel<scalar_t><<<grid, kScanThreads, 0, stream>>>(
          boxes.const_data_ptr<scalar_t>(), area.const_data_ptr<scalar_t>(), categories->const_data_ptr<int64_t>(), B,
          N, threshold, kept_index.mutable_data_ptr<int64_t>(), keep.mutable_data_ptr<bool>());
      FASTDET_CUDA_LAUNCH_CHECK();
    });
    return keep;
  }

  SegmentSource source{nullptr, B, N};
  Tensor table;  // keeps the device copy of the segment table alive
  const int64_t* category_ptr = nullptr;
  int64_t total_tiles, total_words, total_removed;
  if (categories.has_value() && !sync_free) {
    // One device-to-host copy of the categories to size each category's own mask.
    const Device cpu(torch::headeronly::DeviceType::CPU);
    const auto host_categories = torch::stable::to(*categories, cpu);
    const auto seg = nms::find_segments(host_categories.const_data_ptr<int64_t>(), B, N);
    const int64_t S = static_cast<int64_t>(seg.size() / 3);
    auto host = aten::empty({S, kFields}, kLong, host_categories);
    int64_t* row = host.mutable_data_ptr<int64_t>();
    total_tiles = total_words = total_removed = 0;
    for (int64_t s = 0; s < S; ++s, row += kFields) {
      const int64_t count = seg[3 * s + 2] - seg[3 * s + 1];
      const int64_t words = (count + kBlockBits - 1) / kBlockBits;
      row[kImage] = seg[3 * s];
      row[kBegin] = seg[3 * s + 1];
      row[kCount] = count;
      row[kWords] = words;
      row[kMaskOffset] = total_words;
      row[kRemovedOffset] = total_removed;
      row[kTileOffset] = total_tiles;
      total_words += count * words;
      total_removed += words;
      total_tiles += words * words;
    }
    table = torch::stable::to(host, boxes.device());
    source = SegmentSource{table.const_data_ptr<int64_t>(), S, N};
  } else {
    if (categories.has_value()) {
      category_ptr = categories->const_data_ptr<int64_t>();
    }
    const int64_t words = (N + kBlockBits - 1) / kBlockBits;
    total_tiles = B * words * words;
    total_words = B * N * words;
    total_removed = B * words;
  }

  auto mask = aten::empty({total_words}, kLong, boxes);
  auto removed = aten::zeros({total_removed}, kLong, boxes);
  auto* mask_ptr = reinterpret_cast<uint64_t*>(mask.mutable_data_ptr<int64_t>());
  auto* removed_ptr = reinterpret_cast<uint64_t*>(removed.mutable_data_ptr<int64_t>());

  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "_nms_keep_flags", [&] {
    const scalar_t threshold = std::is_same_v<scalar_t, double>
                                   ? static_cast<scalar_t>(iou_threshold)
                                   : static_cast<scalar_t>(nms::threshold_as_float(iou_threshold));
    const auto grid = static_cast<unsigned int>(std::min<int64_t>(total_tiles, kMaxBlocks));
    nms_mask_kernel<scalar_t><<<grid, kBlockBits, 0, stream>>>(boxes.const_data_ptr<scalar_t>(),
                                                               area.const_data_ptr<scalar_t>(), category_ptr, source,
                                                               total_tiles, threshold, mask_ptr);
    FASTDET_CUDA_LAUNCH_CHECK();
  });
  const auto scan_grid = static_cast<unsigned int>(std::min<int64_t>(source.num_segments, kMaxBlocks));
  nms_scan_kernel<<<scan_grid, kScanThreads, 0, stream>>>(mask_ptr, source, removed_ptr,
                                                          keep.mutable_data_ptr<bool>());
  FASTDET_CUDA_LAUNCH_CHECK();
  return keep;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CUDA, m) {
  m.impl("_nms_keep_flags", TORCH_BOX(&fastdet::nms_keep_flags_cuda));
}
