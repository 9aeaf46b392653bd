// CPU keep-flag kernel of the NMS family.
//
// Candidates arrive in visit order; each category is a contiguous segment. Greedy NMS is sequential by nature, but a
// candidate's fate depends only on the kept candidates before it, so we test candidates against the kept list
// (coordinate planes for a linear sweep that stops at the first overlap, plus a uniform grid for large segments so a
// candidate meets only the kept boxes near it). Work is spread over
// the cores in two ways: independent segments (categories, images) run in parallel; a single large segment is cut
// into chunks whose candidates are first tested against all earlier kept boxes in parallel, then resolved against
// each other sequentially. Both produce exactly the sequential greedy result.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/nms.h"
#include "ops/nms_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace {

template <typename T>
struct Planes {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
};

// Only a box with finite coordinates, x1 < x2 and y1 < y2 can take part in a suppression: for any other box the
// clamped intersection is 0 (or the IoU is NaN), and 0 > threshold never holds for threshold >= 0. Such boxes are
// left out of the spatial index and are never suppressed, exactly as the pairwise test would decide.
template <typename T>
inline bool can_overlap(T x1, T y1, T x2, T y2) {
  return std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2) && x1 < x2 && y1 < y2;
}

// Kept boxes of the current segment, as coordinate planes (for linear sweeps) plus a uniform grid over the segment's
// extent (for large segments). Suppression needs intersecting interiors, which share at least one grid cell, so
// testing only the kept boxes registered in the candidate's cells gives exactly the answer of a full sweep.
template <typename T>
class KeptBoxes {
 public:
  // Prepare for the segment [begin, end); the grid is built only when the segment is large enough to profit.
  void reset(const Planes<T>& p, int64_t begin, int64_t end) {
    x1_.clear();
    y1_.clear();
    x2_.clear();
    y2_.clear();
    area_.clear();
    big_.clear();
    for (auto& cell : cells_) cell.clear();
    use_grid_ = false;
    if (end - begin < kGridMinCandidates) return;
    T min_x = std::numeric_limits<T>::infinity(), min_y = min_x, max_x = -min_x, max_y = -min_x;
    double side_sum = 0;
    int64_t proper = 0;
    for (int64_t i = begin; i < end; ++i) {
      if (!can_overlap(p.x1[i], p.y1[i], p.x2[i], p.y2[i])) continue;
      min_x = std::min(min_x, p.x1[i]);
      min_y = std::min(min_y, p.y1[i]);
      max_x = std::max(max_x, p.x2[i]);
      max_y = std::max(max_y, p.y2[i]);
      side_sum += static_cast<double>(std::max(p.x2[i] - p.x1[i], p.y2[i] - p.y1[i]));
      ++proper;
    }
    if (proper < kGridMinCandidates) return;
    // Cells about the size of an average box: a typical box then touches 1 to 4 cells.
    double cell = side_sum / static_cast<double>(proper);
    const double extent = std::max(static_cast<double>(max_x) - min_x, static_cast<double>(max_y) - min_y);
    cell = std::max(cell, extent / kMaxCellsPerSide);
    if (!(cell > 0) || !std::isfinite(cell)) return;
    origin_x_ = min_x;
    origin_y_ = min_y;
    inv_cell_ = 1.0 / cell;
    cols_ = static_cast<int64_t>((static_cast<double>(max_x) - min_x) * inv_cell_) + 1;
    rows_ = static_cast<int64_t>((static_cast<double>(max_y) - min_y) * inv_cell_) + 1;
    if (cols_ > kMaxCellsPerSide + 1 || rows_ > kMaxCellsPerSide + 1) return;
    if (static_cast<int64_t>(cells_.size()) < cols_ * rows_) cells_.resize(cols_ * rows_);
    use_grid_ = true;
  }

  int64_t size() const { return static_cast<int64_t>(x1_.size()); }

  void push(const Planes<T>& p, int64_t i) {
    const auto k = static_cast<int32_t>(size());
    x1_.push_back(p.x1[i]);
    y1_.push_back(p.y1[i]);
    x2_.push_back(p.x2[i]);
    y2_.push_back(p.y2[i]);
    area_.push_back(p.area[i]);
    if (!use_grid_ || !can_overlap(p.x1[i], p.y1[i], p.x2[i], p.y2[i])) return;
    const Span span = span_of(p.x1[i], p.y1[i], p.x2[i], p.y2[i]);
    if (span.cells() > kMaxCellsPerBox) {
      big_.push_back(k);
      return;
    }
    for (int64_t r = span.r0; r <= span.r1; ++r)
      for (int64_t c = span.c0; c <= span.c1; ++c) cells_[r * cols_ + c].push_back(k);
  }

  // Does a kept box in [begin, end) suppress candidate i? (linear sweep)
  bool sweep(const Planes<T>& p, int64_t i, int64_t begin, int64_t end, T threshold) const {
    const T cx1 = p.x1[i], cy1 = p.y1[i], cx2 = p.x2[i], cy2 = p.y2[i], carea = p.area[i];
    // Fixed-width blocks without an early exit inside vectorise (min/max/div over lanes); the exit is per block.
    constexpr int64_t kBlock = 16;
    int64_t k = begin;
    for (; k + kBlock <= end; k += kBlock) {
      int hits = 0;
      for (int64_t u = k; u < k + kBlock; ++u) {
        hits |= nms::iou_above<T>(x1_[u], y1_[u], x2_[u], y2_[u], area_[u], cx1, cy1, cx2, cy2, carea, threshold);
      }
      if (hits) return true;
    }
    for (; k < end; ++k) {
      if (nms::iou_above<T>(x1_[k], y1_[k], x2_[k], y2_[k], area_[k], cx1, cy1, cx2, cy2, carea, threshold)) {
        return true;
      }
    }
    return false;
  }

  // Does any kept box (all of them, the grid is complete) suppress candidate i?
  bool suppresses(const Planes<T>& p, int64_t i, T threshold) const {
    if (!use_grid_) return sweep(p, i, 0, size(), threshold);
    const T cx1 = p.x1[i], cy1 = p.y1[i], cx2 = p.x2[i], cy2 = p.y2[i], carea = p.area[i];
    if (!can_overlap(cx1, cy1, cx2, cy2)) return false;
    const Span span = span_of(cx1, cy1, cx2, cy2);
    if (span.cells() > kMaxCellsPerBox) return sweep(p, i, 0, size(), threshold);
    auto test = [&](int32_t k) {
      return nms::iou_above<T>(x1_[k], y1_[k], x2_[k], y2_[k], area_[k], cx1, cy1, cx2, cy2, carea, threshold);
    };
    for (int32_t k : big_)
      if (test(k)) return true;
    for (int64_t r = span.r0; r <= span.r1; ++r)
      for (int64_t c = span.c0; c <= span.c1; ++c)
        for (int32_t k : cells_[r * cols_ + c])
          if (test(k)) return true;
    return false;
  }

 private:
  static constexpr int64_t kGridMinCandidates = 2048;
  static constexpr double kMaxCellsPerSide = 256;
  static constexpr int64_t kMaxCellsPerBox = 64;

  struct Span {
    int64_t c0, c1, r0, r1;
    int64_t cells() const { return (c1 - c0 + 1) * (r1 - r0 + 1); }
  };

  // Cell ranges covered by a box whose corners lie inside the grid's extent (true for every box of the segment).
  // The mapping x -> floor((x - origin) / cell) is monotonic, so two boxes sharing an interior point share a cell.
  Span span_of(T x1, T y1, T x2, T y2) const {
    auto col = [&](T x) {
      return std::min<int64_t>(cols_ - 1, std::max<int64_t>(0, static_cast<int64_t>((x - origin_x_) * inv_cell_)));
    };
    auto row = [&](T y) {
      return std::min<int64_t>(rows_ - 1, std::max<int64_t>(0, static_cast<int64_t>((y - origin_y_) * inv_cell_)));
    };
    return {col(x1), col(x2), row(y1), row(y2)};
  }

  std::vector<T> x1_, y1_, x2_, y2_, area_;
  std::vector<std::vector<int32_t>> cells_;
  std::vector<int32_t> big_;
  bool use_grid_ = false;
  double origin_x_ = 0, origin_y_ = 0, inv_cell_ = 1;
  int64_t cols_ = 0, rows_ = 0;
};

// Greedy NMS of one segment, in chunks: candidates of a chunk are first screened against every box kept before the
// chunk (in parallel when allowed and worthwhile), then resolved in order against the boxes kept within the chunk.
template <typename T>
void greedy_segment(const Planes<T>& p, int64_t begin, int64_t end, T threshold, bool* keep, KeptBoxes<T>& kept,
                    bool allow_parallel) {
  constexpr int64_t kChunk = 512;
  kept.reset(p, begin, end);
  char screened[kChunk];
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t chunk_end = std::min(end, chunk + kChunk);
    const int64_t kept_before = kept.size();
    auto screen = [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        screened[i - chunk] = kept_before > 0 && kept.suppresses(p, i, threshold);
      }
    };
    // A parallel region costs a few microseconds; only worth it when the chunk has real work to share.
    if (allow_parallel && kept_before * (chunk_end - chunk) >= 65536) {
      parallel_for(chunk, chunk_end, 16, screen);
    } else {
      screen(chunk, chunk_end);
    }
    for (int64_t i = chunk; i < chunk_end; ++i) {
      const bool suppressed = screened[i - chunk] || kept.sweep(p, i, kept_before, kept.size(), threshold);
      keep[i] = !suppressed;
      if (!suppressed) kept.push(p, i);
    }
  }
}

template <typename T>
void keep_flags_kernel(const Tensor& planes_t, const std::vector<int64_t>& segments, int64_t N, T threshold,
                       Tensor& keep_t) {
  // planes_t: [B, 5, N] (x1, y1, x2, y2, area); segments: S triples (image, begin, end) in visit order.
  const T* planes = planes_t.const_data_ptr<T>();
  bool* keep = keep_t.mutable_data_ptr<bool>();
  const int64_t* seg = segments.data();
  const int64_t S = static_cast<int64_t>(segments.size() / 3);
  auto planes_of = [&](int64_t image) {
    const T* base = planes + image * 5 * N;
    return Planes<T>{base, base + N, base + 2 * N, base + 3 * N, base + 4 * N};
  };
  if (S == 1) {
    KeptBoxes<T> kept;
    greedy_segment<T>(planes_of(seg[0]), seg[1], seg[2], threshold, keep + seg[0] * N, kept, /*allow_parallel=*/true);
    return;
  }
  parallel_for(0, S, 1, [&](int64_t b, int64_t e) {
    KeptBoxes<T> kept;
    for (int64_t s = b; s < e; ++s) {
      const int64_t image = seg[3 * s];
      greedy_segment<T>(planes_of(image), seg[3 * s + 1], seg[3 * s + 2], threshold, keep + image * N, kept,
                        /*allow_parallel=*/false);
    }
  });
}

// boxes [B, N, 4] contiguous float32/float64 in visit order, categories [B, N] int64 contiguous and grouped, or None
// (prepared and checked by the composite in nms.cpp).
Tensor nms_keep_flags_cpu(const Tensor& boxes, const std::optional<Tensor>& categories, double iou_threshold,
                          bool /*sync_free: the CPU never synchronises*/) {
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto keep = aten::zeros({B, N}, kBool, boxes);
  if (B == 0 || N == 0) {
    return keep;
  }
  const auto segments = nms::find_segments(
      categories.has_value() ? categories->const_data_ptr<int64_t>() : nullptr, B, N);
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "_nms_keep_flags", [&] {
    // Coordinate planes plus areas, [B, 5, N] = (x1, y1, x2, y2, (x2 - x1) * (y2 - y1)): one subtraction per side and
    // one product, each rounded once, so the areas are bitwise those of the CUDA kernel's elementwise ops.
    auto planes = aten::empty({B, 5, N}, boxes.scalar_type(), boxes);
    const scalar_t* src = boxes.const_data_ptr<scalar_t>();
    scalar_t* dst = planes.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* box = src + b * N * 4;
      scalar_t* plane = dst + b * 5 * N;
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t x1 = box[4 * i], y1 = box[4 * i + 1], x2 = box[4 * i + 2], y2 = box[4 * i + 3];
        const scalar_t width = x2 - x1;
        const scalar_t height = y2 - y1;
        plane[i] = x1;
        plane[N + i] = y1;
        plane[2 * N + i] = x2;
        plane[3 * N + i] = y2;
        plane[4 * N + i] = width * height;
      }
    }
    const scalar_t threshold = std::is_same_v<scalar_t, double>
                                   ? static_cast<scalar_t>(iou_threshold)
                                   : static_cast<scalar_t>(nms::threshold_as_float(iou_threshold));
    keep_flags_kernel<scalar_t>(planes, segments, N, threshold, keep);
  });
  return keep;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_nms_keep_flags", TORCH_BOX(&fastdet::nms_keep_flags_cpu));
}
