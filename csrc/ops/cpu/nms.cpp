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
#include <memory>
#include <tuple>
#include <type_traits>
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

// ---------------------------------------------------------------------------------------------------- multiclass_nms
// The whole of multiclass_nms for one image, without materialising anything of size N x C beyond the input: a score
// threshold pass collects the passing (box, class) candidates, a partial selection keeps the best pre_nms_top_k of
// them in the order of a stable descending sort (score desc, flat index box * C + class asc), the candidates are
// grouped by class (a stable counting sort, so each class stays in score order) and each class runs the greedy NMS
// above. The first max_detections survivors in score order fill the fixed-size output. This is exactly the result of
// the generic path (top-k, nms_fixed, compaction): candidates failing the threshold sort after every passing one
// there, so they never suppress a passing candidate and are never reported.
template <typename T, typename S>
struct MulticlassImage {
  const T* boxes;   // [N, 4] or [N, C, 4]
  const S* scores;  // [N * C]
  T* out_boxes;     // [K, 4]
  S* out_scores;    // [K]
  int64_t* out_labels;
  int64_t* out_num;
};

template <typename T, typename S>
class MulticlassWorkspace {
 public:
  void run(const MulticlassImage<T, S>& im, int64_t N, int64_t C, bool per_class, S score_threshold, T iou_threshold,
           int64_t top_k, int64_t K, bool class_agnostic) {
    const int64_t NC = N * C;
    // 1. threshold pass (a NaN score fails, as score > threshold is false)
    candidates_.clear();
    for (int64_t f = 0; f < NC; ++f) {
      if (im.scores[f] > score_threshold) candidates_.push_back(f);
    }
    // 2. the best top_k in stable descending order: unique flat indices make (score desc, index asc) a strict order
    const S* sc = im.scores;
    auto before = [sc](int64_t a, int64_t b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a < b); };
    if (static_cast<int64_t>(candidates_.size()) > top_k) {
      std::nth_element(candidates_.begin(), candidates_.begin() + top_k, candidates_.end(), before);
      candidates_.resize(top_k);
    }
    std::sort(candidates_.begin(), candidates_.end(), before);
    const int64_t M = static_cast<int64_t>(candidates_.size());
    // 3. group by class (stable), as coordinate planes in the accumulation dtype
    const int64_t groups = class_agnostic ? 1 : C;
    start_.assign(groups + 1, 0);
    if (!class_agnostic) {
      for (int64_t f : candidates_) ++start_[f % C + 1];
    } else {
      start_[1] = M;
    }
    for (int64_t g = 0; g < groups; ++g) start_[g + 1] += start_[g];
    cursor_.assign(start_.begin(), start_.end() - 1);
    position_.resize(M);
    planes_.resize(5 * M);
    T* x1 = planes_.data();
    T* y1 = x1 + M;
    T* x2 = y1 + M;
    T* y2 = x2 + M;
    T* area = y2 + M;
    for (int64_t r = 0; r < M; ++r) {
      const int64_t f = candidates_[r];
      const int64_t p = class_agnostic ? r : cursor_[f % C]++;
      position_[r] = p;
      const T* box = im.boxes + 4 * (per_class ? f : f / C);
      x1[p] = box[0];
      y1[p] = box[1];
      x2[p] = box[2];
      y2[p] = box[3];
      area[p] = (box[2] - box[0]) * (box[3] - box[1]);
    }
    // 4. greedy NMS per class
    if (keep_capacity_ < M) {
      keep_capacity_ = std::max<int64_t>(M, 2 * keep_capacity_);
      keep_.reset(new bool[keep_capacity_]);
    }
    std::fill(keep_.get(), keep_.get() + M, false);
    const Planes<T> planes{x1, y1, x2, y2, area};
    for (int64_t g = 0; g < groups; ++g) {
      if (start_[g] < start_[g + 1]) {
        greedy_segment<T>(planes, start_[g], start_[g + 1], iou_threshold, keep_.get(), kept_,
                          /*allow_parallel=*/false);
      }
    }
    // 5. the first K survivors in score order; padding (zeros, label -1) is already in the outputs
    int64_t k = 0;
    for (int64_t r = 0; r < M && k < K; ++r) {
      if (!keep_[position_[r]]) continue;
      const int64_t f = candidates_[r];
      const T* box = im.boxes + 4 * (per_class ? f : f / C);
      for (int j = 0; j < 4; ++j) im.out_boxes[4 * k + j] = box[j];
      im.out_scores[k] = im.scores[f];
      im.out_labels[k] = f % C;
      ++k;
    }
    *im.out_num = k;
  }

 private:
  std::vector<int64_t> candidates_, start_, cursor_, position_;
  std::vector<T> planes_;
  std::unique_ptr<bool[]> keep_;  // keep flags in grouped order (vector<bool> has no data())
  int64_t keep_capacity_ = 0;
  KeptBoxes<T> kept_;
};

// boxes [B, N, 4] or [B, N, C, 4] contiguous float32/float64, scores [B, N, C] contiguous float32/float64 (the
// wrapper in fastdet/ops/nms.py casts float16/bfloat16 exactly to float32 and checks every argument).
std::tuple<Tensor, Tensor, Tensor, Tensor> multiclass_nms_cpu(const Tensor& boxes, const Tensor& scores,
                                                              double score_threshold, double iou_threshold,
                                                              int64_t max_detections, int64_t pre_nms_top_k,
                                                              bool class_agnostic) {
  FASTDET_CHECK(scores.dim() == 3 && scores.is_contiguous(), "scores must be a contiguous [B, N, C] tensor");
  const int64_t B = scores.size(0), N = scores.size(1), C = scores.size(2);
  const bool per_class = boxes.dim() == 4;
  FASTDET_CHECK(boxes.is_contiguous() && boxes.size(0) == B && boxes.size(1) == N && boxes.size(-1) == 4 &&
                    (!per_class || boxes.size(2) == C) && (per_class || boxes.dim() == 3),
                "boxes must be a contiguous [B, N, 4] or [B, N, C, 4] tensor matching scores");
  FASTDET_CHECK(max_detections >= 0 && pre_nms_top_k >= 0, "max_detections and pre_nms_top_k must be >= 0");
  auto out_boxes = aten::zeros({B, max_detections, 4}, boxes.scalar_type(), boxes);
  auto out_scores = aten::zeros({B, max_detections}, scores.scalar_type(), scores);
  auto out_labels = aten::full({B, max_detections}, -1.0, kLong, scores);
  auto out_num = aten::zeros({B}, kLong, scores);
  if (B == 0 || N == 0 || C == 0) return {out_boxes, out_scores, out_labels, out_num};
  FASTDET_DISPATCH_FLOAT_DOUBLE(boxes.scalar_type(), "multiclass_nms", [&] {
    using box_t = scalar_t;
    const box_t iou_t = std::is_same_v<box_t, double> ? static_cast<box_t>(iou_threshold)
                                                       : static_cast<box_t>(nms::threshold_as_float(iou_threshold));
    FASTDET_DISPATCH_FLOAT_DOUBLE(scores.scalar_type(), "multiclass_nms", [&] {
      using score_t = scalar_t;
      const score_t score_t_threshold = std::is_same_v<score_t, double>
                                            ? static_cast<score_t>(score_threshold)
                                            : static_cast<score_t>(nms::threshold_as_float(score_threshold));
      const box_t* bx = boxes.const_data_ptr<box_t>();
      const score_t* sc = scores.const_data_ptr<score_t>();
      box_t* ob = out_boxes.mutable_data_ptr<box_t>();
      score_t* os = out_scores.mutable_data_ptr<score_t>();
      int64_t* ol = out_labels.mutable_data_ptr<int64_t>();
      int64_t* on = out_num.mutable_data_ptr<int64_t>();
      const int64_t box_stride = (per_class ? N * C : N) * 4;
      parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        MulticlassWorkspace<box_t, score_t> work;
        for (int64_t b = b0; b < b1; ++b) {
          const MulticlassImage<box_t, score_t> im{bx + b * box_stride, sc + b * N * C, ob + b * max_detections * 4,
                                                   os + b * max_detections, ol + b * max_detections, on + b};
          work.run(im, N, C, per_class, score_t_threshold, iou_t, pre_nms_top_k, max_detections, class_agnostic);
        }
      });
    });
  });
  return {out_boxes, out_scores, out_labels, out_num};
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_nms_keep_flags", TORCH_BOX(&fastdet::nms_keep_flags_cpu));
  m.impl("_multiclass_nms_kernel", TORCH_BOX(&fastdet::multiclass_nms_cpu));
}
