#pragma once
// Grid generators shared by the CPU and CUDA kernels: torchvision's AnchorGenerator (grid_anchors), SSD's
// DefaultBoxGenerator (ssd_default_boxes) and YOLO-style grid priors (grid_priors).
//
// All three tile a per-level table of cell shapes over a per-level feature grid and write every level of the pyramid
// into one [N, 4] tensor, in torchvision's order: level by level, within a level row-major over the grid (y, then x),
// within a cell the level's table in order. Element n of the output is found from n alone (a short scan over the
// level offsets), so one kernel launch covers all levels.
//
// Ops (schema file anchors.cpp): the public grid_anchors, ssd_default_boxes and grid_priors check their arguments
// once and call the per-backend kernels _grid_anchors_kernel, _ssd_default_boxes_kernel and _grid_priors_kernel with
// the same arguments, the cell table made contiguous and the level description validated (see build_levels).
#include <torch/headeronly/macros/Macros.h>

#include <cstdint>

#include "ops/exact_math.h"
#include "ops/stable.h"

namespace fastdet {
namespace anchors {

// Feature pyramids have 3-7 levels in practice; a fixed bound lets the level table travel to a CUDA kernel by value,
// with no host-to-device copy (and so no synchronisation) per call.
constexpr int kMaxLevels = 16;

// Per-level geometry, by value. Sizes are int64 so H * W * A never overflows.
struct Levels {
  int num_levels;
  int64_t start[kMaxLevels + 1];  // first output row of each level; start[num_levels] = total rows
  int64_t table_start[kMaxLevels];  // first row of the level's cell table
  int64_t cells[kMaxLevels];  // shapes per grid cell (A)
  int64_t width[kMaxLevels];  // grid width (W); the height is implied by start[]
  double step_x[kMaxLevels];  // grid_anchors / grid_priors: stride; ssd_default_boxes: divisor of (x + 0.5)
  double step_y[kMaxLevels];
};

// Fills a Levels from a level description the schema file has validated (1 to kMaxLevels levels, grid_sizes
// (h0, w0, h1, w1, ...) and steps_yx ((y, x) pairs) of matching lengths, non-negative sizes and counts).
inline Levels build_levels(IntArrayRef cells_per_level, IntArrayRef grid_sizes,
                           torch::headeronly::HeaderOnlyArrayRef<double> steps_yx) {
  const int64_t L = static_cast<int64_t>(cells_per_level.size());
  Levels lv{};
  lv.num_levels = static_cast<int>(L);
  int64_t row = 0, table = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = cells_per_level[l], h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
    lv.start[l] = row;
    lv.table_start[l] = table;
    lv.cells[l] = a;
    lv.width[l] = w;
    lv.step_y[l] = steps_yx[2 * l];
    lv.step_x[l] = steps_yx[2 * l + 1];
    row += h * w * a;
    table += a;
  }
  lv.start[L] = row;
  return lv;
}

// Locates output row n: level, grid x and y, and the row of the level's cell table.
struct Cell {
  int level;
  int64_t x, y, table_row;
};

C10_HOST_DEVICE inline Cell locate(const Levels& lv, int64_t n) {
  int l = 0;
  while (l + 1 < lv.num_levels && n >= lv.start[l + 1]) {
    ++l;
  }
  const int64_t local = n - lv.start[l];
  const int64_t a = local % lv.cells[l];
  const int64_t cell = local / lv.cells[l];
  return Cell{l, cell % lv.width[l], cell / lv.width[l], lv.table_start[l] + a};
}

// Rounds a value formed in double to T. float16/bfloat16 go through float32 (as torch's own conversions of float64
// data to them do), so every backend and the reference agree on the double rounding.
template <typename T>
C10_HOST_DEVICE inline T round_to(double v) {
  return static_cast<T>(static_cast<float>(v));
}
template <>
C10_HOST_DEVICE inline double round_to<double>(double v) {
  return v;
}

// Calls f(n, cell) for rows [begin, end) in order, locating only the first row of each level by division and stepping
// the (anchor, x, y) counters for the rest: the CPU kernels' inner loop then has no 64-bit divisions.
template <typename F>
inline void for_each_row(const Levels& lv, int64_t begin, int64_t end, F&& f) {
  int64_t n = begin;
  while (n < end) {
    Cell c = locate(lv, n);
    const int l = c.level;
    const int64_t stop = end < lv.start[l + 1] ? end : lv.start[l + 1];
    int64_t a = c.table_row - lv.table_start[l];
    for (; n < stop; ++n) {
      c.table_row = lv.table_start[l] + a;
      f(n, c);
      if (++a == lv.cells[l]) {
        a = 0;
        if (++c.x == lv.width[l]) {
          c.x = 0;
          ++c.y;
        }
      }
    }
  }
}

// ---- per-row formulas, shared by both backends so they round identically ----------------------------------------
// Every double operation below is explicitly rounded (exact_math.h): nvcc would otherwise fuse the centre
// (x + offset) * stride with the following -/+ 0.5 * w or + cell anchor into one FMA, so for float64 the centre would
// not be rounded on its own as on the CPU and in the reference (stride 24, offset 0.3 differ in the last bit).

// The shift (x + offset) * stride of grid cell x, rounded after each operation.
C10_HOST_DEVICE inline double grid_shift(int64_t x, double offset, double stride) {
  return exact::mul_rn(exact::add_rn(static_cast<double>(x), offset), stride);
}

// torchvision AnchorGenerator: shift + cell anchor, where the shift (x * stride) is converted to the output dtype T
// first and the sum is rounded once to T. torchvision adds an integer shift tensor to the T cell anchors, which type
// promotion evaluates exactly this way (for float16 the sum is formed in float and rounded to half once). With
// offset != 0 the shift (x + offset) * stride is formed in double and rounded to T, then added the same way.
template <typename T>
C10_HOST_DEVICE inline void grid_anchor_row(const Levels& lv, const T* cell_anchors, double offset, const Cell& c,
                                            T* out) {
  using A = opmath_t<T>;
  const double sx = grid_shift(c.x, offset, lv.step_x[c.level]);
  const double sy = grid_shift(c.y, offset, lv.step_y[c.level]);
  const A ax = static_cast<A>(round_to<T>(sx));
  const A ay = static_cast<A>(round_to<T>(sy));
  const T* base = cell_anchors + c.table_row * 4;
  out[0] = static_cast<T>(exact::add_rn(ax, static_cast<A>(base[0])));
  out[1] = static_cast<T>(exact::add_rn(ay, static_cast<A>(base[1])));
  out[2] = static_cast<T>(exact::add_rn(ax, static_cast<A>(base[2])));
  out[3] = static_cast<T>(exact::add_rn(ay, static_cast<A>(base[3])));
}

// SSD default boxes, as torchvision's DefaultBoxGenerator computes them: the centre (x + 0.5) / f_k in float32,
// rounded to the feature dtype T, then promoted with the float32 (w, h) table to O = promote(T, float32) where the
// corners (c -/+ 0.5 * w) * image_size are formed, each operation rounded to O. step_x/step_y hold f_k.
template <typename T, typename O>
C10_HOST_DEVICE inline void ssd_default_box_row(const Levels& lv, const float* wh, O image_w, O image_h, const Cell& c,
                                                O* out) {
  const float fx = (static_cast<float>(c.x) + 0.5f) / static_cast<float>(lv.step_x[c.level]);
  const float fy = (static_cast<float>(c.y) + 0.5f) / static_cast<float>(lv.step_y[c.level]);
  const O cx = static_cast<O>(static_cast<T>(fx));
  const O cy = static_cast<O>(static_cast<T>(fy));
  const O hw = O(0.5) * static_cast<O>(wh[c.table_row * 2]);  // exact: a halving
  const O hh = O(0.5) * static_cast<O>(wh[c.table_row * 2 + 1]);
  // nvcc may fuse c -/+ 0.5 * w into one FMA: harmless, the halving is exact, so the sum is rounded once either way.
  const O x1 = cx - hw, y1 = cy - hh, x2 = cx + hw, y2 = cy + hh;
  out[0] = x1 * image_w;
  out[1] = y1 * image_h;
  out[2] = x2 * image_w;
  out[3] = y2 * image_h;
}

// YOLO-style priors: centre ((x + offset) * stride_x, (y + offset) * stride_y) and the level's (w, h), formed in double
// and rounded once to T, as (cx, cy, w, h) or (x1, y1, x2, y2).
template <typename T>
C10_HOST_DEVICE inline void grid_prior_row(const Levels& lv, const double* wh, double offset, bool xyxy, const Cell& c,
                                           T* out) {
  const double cx = grid_shift(c.x, offset, lv.step_x[c.level]);
  const double cy = grid_shift(c.y, offset, lv.step_y[c.level]);
  const double w = wh[c.table_row * 2];
  const double h = wh[c.table_row * 2 + 1];
  if (xyxy) {
    out[0] = round_to<T>(exact::sub_rn(cx, 0.5 * w));
    out[1] = round_to<T>(exact::sub_rn(cy, 0.5 * h));
    out[2] = round_to<T>(exact::add_rn(cx, 0.5 * w));
    out[3] = round_to<T>(exact::add_rn(cy, 0.5 * h));
  } else {
    out[0] = round_to<T>(cx);
    out[1] = round_to<T>(cy);
    out[2] = round_to<T>(w);
    out[3] = round_to<T>(h);
  }
}

// SSD output dtype: float64 for float64 feature maps, float32 otherwise (torchvision concatenates the T centres with
// its float32 (w, h) table, which promotes float16/bfloat16 to float32).
inline ScalarType ssd_output_dtype(ScalarType feature_dtype) {
  return accumulation_type(feature_dtype);
}

}  // namespace anchors
}  // namespace fastdet
