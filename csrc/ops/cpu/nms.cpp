// CPU keep-flag kernel of the NMS family.
//
// Candidates arrive in visit order; each category is a contiguous segment. Greedy NMS is sequential by nature, but a
// candidate's fate depends only on the kept candidates before it, so we test candidates against the kept list
// (stored as coordinate planes, so the test is a linear sweep that stops at the first overlap). Work is spread over
// the cores in two ways: independent segments (categories, images) run in parallel; a single large segment is cut
// into chunks whose candidates are first tested against all earlier kept boxes in parallel, then resolved against
// each other sequentially. Both produce exactly the sequential greedy result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/nms.h"
#include "ops/nms_math.h"

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

// Kept boxes of the current segment, stored as planes for a cache-friendly sweep.
template <typename T>
struct KeptList {
  std::vector<T> x1, y1, x2, y2, area;
  int64_t size() const { return static_cast<int64_t>(x1.size()); }
  void push(const Planes<T>& p, int64_t i) {
    x1.push_back(p.x1[i]);
    y1.push_back(p.y1[i]);
    x2.push_back(p.x2[i]);
    y2.push_back(p.y2[i]);
    area.push_back(p.area[i]);
  }
  void clear() {
    x1.clear();
    y1.clear();
    x2.clear();
    y2.clear();
    area.clear();
  }
  // Does any kept box in [begin, end) suppress candidate i?
  bool suppresses(const Planes<T>& p, int64_t i, int64_t begin, int64_t end, T threshold) const {
    const T cx1 = p.x1[i], cy1 = p.y1[i], cx2 = p.x2[i], cy2 = p.y2[i], carea = p.area[i];
    // Fixed-width blocks without an early exit inside vectorise (min/max/div over lanes); the exit is per block.
    constexpr int64_t kBlock = 16;
    int64_t k = begin;
    for (; k + kBlock <= end; k += kBlock) {
      int hits = 0;
      for (int64_t u = k; u < k + kBlock; ++u) {
        hits |= nms::iou_above<T>(x1[u], y1[u], x2[u], y2[u], area[u], cx1, cy1, cx2, cy2, carea, threshold);
      }
      if (hits) {
        return true;
      }
    }
    for (; k < end; ++k) {
      if (nms::iou_above<T>(x1[k], y1[k], x2[k], y2[k], area[k], cx1, cy1, cx2, cy2, carea, threshold)) {
        return true;
      }
    }
    return false;
  }
};

template <typename T>
void greedy_segment(const Planes<T>& p, int64_t begin, int64_t end, T threshold, bool* keep, KeptList<T>& kept) {
  kept.clear();
  for (int64_t i = begin; i < end; ++i) {
    const bool suppressed = kept.suppresses(p, i, 0, kept.size(), threshold);
    keep[i] = !suppressed;
    if (!suppressed) {
      kept.push(p, i);
    }
  }
}

// One large segment: chunks of candidates are screened against the earlier kept boxes in parallel.
template <typename T>
void greedy_segment_parallel(const Planes<T>& p, int64_t begin, int64_t end, T threshold, bool* keep) {
  constexpr int64_t kChunk = 512;
  KeptList<T> kept;
  std::vector<char> screened(kChunk);
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int64_t chunk_end = std::min(end, chunk + kChunk);
    const int64_t kept_before = kept.size();
    // Screening costs up to (chunk size x kept boxes) tests; below ~64k tests a parallel region is not worth it.
    const bool parallel = kept_before * (chunk_end - chunk) >= 65536;
    auto screen = [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        screened[i - chunk] = kept.suppresses(p, i, 0, kept_before, threshold);
      }
    };
    if (parallel) {
      at::parallel_for(chunk, chunk_end, 16, screen);
    } else {
      screen(chunk, chunk_end);
    }
    for (int64_t i = chunk; i < chunk_end; ++i) {
      const bool suppressed = screened[i - chunk] || kept.suppresses(p, i, kept_before, kept.size(), threshold);
      keep[i] = !suppressed;
      if (!suppressed) {
        kept.push(p, i);
      }
    }
  }
}

template <typename T>
void keep_flags_kernel(const at::Tensor& planes_t, const at::Tensor& segments, int64_t N, T threshold,
                       at::Tensor& keep_t) {
  // planes_t: [B, 5, N] (x1, y1, x2, y2, area); segments: [S, 3] (image, begin, end) in visit order.
  const T* planes = planes_t.const_data_ptr<T>();
  bool* keep = keep_t.mutable_data_ptr<bool>();
  const int64_t* seg = segments.const_data_ptr<int64_t>();
  const int64_t S = segments.size(0);
  auto planes_of = [&](int64_t image) {
    const T* base = planes + image * 5 * N;
    return Planes<T>{base, base + N, base + 2 * N, base + 3 * N, base + 4 * N};
  };
  if (S == 1) {
    greedy_segment_parallel<T>(planes_of(seg[0]), seg[1], seg[2], threshold, keep + seg[0] * N);
    return;
  }
  at::parallel_for(0, S, 1, [&](int64_t b, int64_t e) {
    KeptList<T> kept;
    for (int64_t s = b; s < e; ++s) {
      const int64_t image = seg[3 * s];
      greedy_segment<T>(planes_of(image), seg[3 * s + 1], seg[3 * s + 2], threshold, keep + image * N, kept);
    }
  });
}

at::Tensor nms_keep_flags_cpu(const at::Tensor& boxes, const std::optional<at::Tensor>& categories,
                              double iou_threshold, bool /*sync_free: the CPU never synchronises*/) {
  check_keep_flags_args(boxes, categories, iou_threshold);
  const int64_t B = boxes.size(0), N = boxes.size(1);
  auto keep = at::zeros({B, N}, boxes.options().dtype(at::kBool));
  if (B == 0 || N == 0) {
    return keep;
  }
  const auto acc = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto b = boxes.to(acc);
  auto area = (b.select(2, 2) - b.select(2, 0)) * (b.select(2, 3) - b.select(2, 1));
  auto planes = at::cat({b.transpose(1, 2), area.unsqueeze(1)}, 1).contiguous();  // [B, 5, N]
  auto segments = find_segments(categories, B, N);
  if (acc == at::kDouble) {
    keep_flags_kernel<double>(planes, segments, N, iou_threshold, keep);
  } else {
    keep_flags_kernel<float>(planes, segments, N, nms::threshold_as_float(iou_threshold), keep);
  }
  return keep;
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_nms_keep_flags", &fastdet::nms_keep_flags_cpu);
}
