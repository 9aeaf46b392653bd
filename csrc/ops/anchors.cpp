// Schemas of the grid generators (torchvision anchors, SSD default boxes, YOLO grid priors) and the argument checks
// both backends share. The cell tables (cell anchors, SSD (w, h) pairs, prior sizes) are computed in Python, where
// torchvision computes them, with the same torch operations, so their rounding is torchvision's by construction; the
// kernels only tile them over the grids.
#include "ops/anchors.h"

#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"

namespace fastdet {
namespace anchors {

Levels make_levels(c10::IntArrayRef cells_per_level, c10::IntArrayRef grid_sizes, c10::ArrayRef<double> steps_yx,
                   int64_t table_rows, const char* table_name) {
  const int64_t L = static_cast<int64_t>(cells_per_level.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels, "the number of pyramid levels must be between 1 and ", kMaxLevels, ", got ",
              L);
  TORCH_CHECK(static_cast<int64_t>(grid_sizes.size()) == 2 * L, "grid_sizes must hold (height, width) for each of the ",
              L, " levels (", 2 * L, " numbers), got ", grid_sizes.size());
  TORCH_CHECK(static_cast<int64_t>(steps_yx.size()) == 2 * L, "strides must hold (y, x) for each of the ", L,
              " levels (", 2 * L, " numbers), got ", steps_yx.size());
  Levels lv{};
  lv.num_levels = static_cast<int>(L);
  int64_t row = 0, table = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = cells_per_level[l], h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
    TORCH_CHECK(a >= 0, "level ", l, ": the number of shapes per cell must be >= 0, got ", a);
    TORCH_CHECK(h >= 0 && w >= 0, "level ", l, ": grid size must be non-negative (height, width), got (", h, ", ", w,
                ")");
    for (int k = 0; k < 2; ++k) {
      TORCH_CHECK(std::isfinite(steps_yx[2 * l + k]) && steps_yx[2 * l + k] >= 0, "level ", l,
                  ": strides must be finite and non-negative, got ", steps_yx[2 * l + k]);
    }
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
  TORCH_CHECK(table == table_rows, table_name, " has ", table_rows, " rows but the per-level counts add up to ", table);
  return lv;
}

namespace {

void check_table(const at::Tensor& t, int64_t cols, const char* name) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must have shape [K, ", cols, "], got ", t.sizes());
}

}  // namespace

Levels check_grid_anchors_args(const at::Tensor& cell_anchors, c10::IntArrayRef anchors_per_level,
                               c10::IntArrayRef grid_sizes, c10::ArrayRef<double> strides, double offset) {
  check_table(cell_anchors, 4, "cell_anchors");
  TORCH_CHECK(std::isfinite(offset), "offset must be finite, got ", offset);
  return make_levels(anchors_per_level, grid_sizes, strides, cell_anchors.size(0), "cell_anchors");
}

Levels check_ssd_default_boxes_args(const at::Tensor& wh_pairs, c10::IntArrayRef boxes_per_level,
                                    c10::IntArrayRef grid_sizes, c10::ArrayRef<double> divisors,
                                    c10::IntArrayRef image_size, at::ScalarType dtype) {
  TORCH_CHECK(wh_pairs.scalar_type() == at::kFloat && wh_pairs.dim() == 2 && wh_pairs.size(1) == 2,
              "wh_pairs must be a float32 tensor of shape [K, 2], got ", wh_pairs.scalar_type(), " ",
              wh_pairs.sizes());
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating-point dtype, got ", dtype);
  TORCH_CHECK(image_size.size() == 2 && image_size[0] >= 0 && image_size[1] >= 0,
              "image_size must be (height, width) >= 0, got ", image_size);
  auto lv = make_levels(boxes_per_level, grid_sizes, divisors, wh_pairs.size(0), "wh_pairs");
  for (int l = 0; l < lv.num_levels; ++l) {
    TORCH_CHECK(lv.step_x[l] > 0 && lv.step_y[l] > 0, "level ", l, ": the grid divisors must be positive, got (",
                lv.step_y[l], ", ", lv.step_x[l], ")");
  }
  return lv;
}

Levels check_grid_priors_args(const at::Tensor& wh, c10::IntArrayRef priors_per_level, c10::IntArrayRef grid_sizes,
                              c10::ArrayRef<double> strides, double offset, at::ScalarType dtype) {
  TORCH_CHECK(wh.scalar_type() == at::kDouble && wh.dim() == 2 && wh.size(1) == 2,
              "wh must be a float64 tensor of shape [K, 2], got ", wh.scalar_type(), " ", wh.sizes());
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating-point dtype, got ", dtype);
  TORCH_CHECK(std::isfinite(offset), "offset must be finite, got ", offset);
  return make_levels(priors_per_level, grid_sizes, strides, wh.size(0), "wh");
}

}  // namespace anchors
}  // namespace fastdet

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // torchvision AnchorGenerator over all levels: cell_anchors [sum A_l, 4] (zero-centred, already rounded, in the
  // output dtype and device), grid_sizes (h0, w0, h1, w1, ...), strides (sy0, sx0, ...). Returns [sum H W A, 4].
  m.def("grid_anchors(Tensor cell_anchors, int[] anchors_per_level, SymInt[] grid_sizes, float[] strides, "
        "float offset) -> Tensor");
  // SSD default boxes: wh_pairs [sum P_l, 2] float32 (already clipped if requested), divisors (f_y0, f_x0, ...),
  // image_size (height, width), dtype of the feature maps. Returns [sum H W P, 4] xyxy in promote(dtype, float32).
  m.def("ssd_default_boxes(Tensor wh_pairs, int[] boxes_per_level, SymInt[] grid_sizes, float[] divisors, "
        "int[] image_size, ScalarType dtype) -> Tensor");
  // YOLO-style priors: wh [sum P_l, 2] float64 (prior sizes in pixels), strides (sy0, sx0, ...), centre offset in
  // cells. Returns [sum H W P, 4] in dtype as (cx, cy, w, h), or (x1, y1, x2, y2) if xyxy, formed in float64 and
  // rounded once.
  m.def("grid_priors(Tensor wh, int[] priors_per_level, SymInt[] grid_sizes, float[] strides, float offset, "
        "bool xyxy, ScalarType dtype) -> Tensor");
}
