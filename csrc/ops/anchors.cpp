// Schemas of the grid generators (torchvision anchors, SSD default boxes, YOLO grid priors): argument checks and
// layout, written once for every backend; the kernels (cpu/anchors.cpp, cuda/anchors.cu) receive prepared arguments
// only. The cell tables (cell anchors, SSD (w, h) pairs, prior sizes) are computed in Python, where torchvision
// computes them, with the same torch operations, so their rounding is torchvision's by construction; the kernels only
// tile them over the grids.
#include "ops/anchors.h"

#include <cmath>
#include <vector>

#include "ops/checks.h"

namespace fastdet {
namespace {

using DoubleArrayRef = torch::headeronly::HeaderOnlyArrayRef<double>;

// Validates a level description for anchors::build_levels: 1 to kMaxLevels levels, grid_sizes (h0, w0, h1, w1, ...)
// and steps_yx ((y, x) pairs) of matching lengths, non-negative counts, sizes and finite steps, and the cell table's
// table_rows rows matching the per-level counts.
void check_levels(IntArrayRef cells_per_level, IntArrayRef grid_sizes, DoubleArrayRef steps_yx, int64_t table_rows,
                  const char* table_name) {
  const int64_t L = static_cast<int64_t>(cells_per_level.size());
  FASTDET_CHECK(L >= 1 && L <= anchors::kMaxLevels, "the number of pyramid levels must be between 1 and ",
                anchors::kMaxLevels, ", got ", L);
  FASTDET_CHECK(static_cast<int64_t>(grid_sizes.size()) == 2 * L, "grid_sizes must hold (height, width) for each of ",
                "the ", L, " levels (", 2 * L, " numbers), got ", grid_sizes.size());
  FASTDET_CHECK(static_cast<int64_t>(steps_yx.size()) == 2 * L, "strides must hold (y, x) for each of the ", L,
                " levels (", 2 * L, " numbers), got ", steps_yx.size());
  int64_t table = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = cells_per_level[l], h = grid_sizes[2 * l], w = grid_sizes[2 * l + 1];
    FASTDET_CHECK(a >= 0, "level ", l, ": the number of shapes per cell must be >= 0, got ", a);
    FASTDET_CHECK(h >= 0 && w >= 0, "level ", l, ": grid size must be non-negative (height, width), got (", h, ", ",
                  w, ")");
    for (int k = 0; k < 2; ++k) {
      FASTDET_CHECK(std::isfinite(steps_yx[2 * l + k]) && steps_yx[2 * l + k] >= 0, "level ", l,
                    ": strides must be finite and non-negative, got ", steps_yx[2 * l + k]);
    }
    table += a;
  }
  FASTDET_CHECK(table == table_rows, table_name, " has ", table_rows, " rows but the per-level counts add up to ",
                table);
}

void check_table(const Tensor& t, int64_t cols, const char* name) {
  check_floating(t, name);
  FASTDET_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must have shape [K, ", cols, "], got ", shape_of(t));
}

Tensor grid_anchors(const Tensor& cell_anchors, IntArrayRef anchors_per_level, IntArrayRef grid_sizes,
                    DoubleArrayRef strides, double offset) {
  check_table(cell_anchors, 4, "cell_anchors");
  FASTDET_CHECK(std::isfinite(offset), "offset must be finite, got ", offset);
  check_levels(anchors_per_level, grid_sizes, strides, cell_anchors.size(0), "cell_anchors");
  return call_op<Tensor>("fastdet::_grid_anchors_kernel", aten::contiguous(cell_anchors), anchors_per_level,
                         grid_sizes, strides, offset);
}

Tensor ssd_default_boxes(const Tensor& wh_pairs, IntArrayRef boxes_per_level, IntArrayRef grid_sizes,
                         DoubleArrayRef divisors, IntArrayRef image_size, ScalarType dtype) {
  FASTDET_CHECK(wh_pairs.scalar_type() == kFloat && wh_pairs.dim() == 2 && wh_pairs.size(1) == 2,
                "wh_pairs must be a float32 tensor of shape [K, 2], got ", wh_pairs.scalar_type(), " ",
                shape_of(wh_pairs));
  FASTDET_CHECK(is_floating(dtype), "dtype must be a floating-point dtype, got ", dtype);
  FASTDET_CHECK(image_size.size() == 2 && image_size[0] >= 0 && image_size[1] >= 0,
                "image_size must be (height, width) >= 0, got ", shape_of(image_size));
  check_levels(boxes_per_level, grid_sizes, divisors, wh_pairs.size(0), "wh_pairs");
  for (size_t l = 0; l < boxes_per_level.size(); ++l) {
    FASTDET_CHECK(divisors[2 * l + 1] > 0 && divisors[2 * l] > 0, "level ", l,
                  ": the grid divisors must be positive, got (", divisors[2 * l], ", ", divisors[2 * l + 1], ")");
  }
  return call_op<Tensor>("fastdet::_ssd_default_boxes_kernel", aten::contiguous(wh_pairs), boxes_per_level,
                         grid_sizes, divisors, image_size, dtype);
}

Tensor grid_priors(const Tensor& wh, IntArrayRef priors_per_level, IntArrayRef grid_sizes, DoubleArrayRef strides,
                   double offset, bool xyxy, ScalarType dtype) {
  FASTDET_CHECK(wh.scalar_type() == kDouble && wh.dim() == 2 && wh.size(1) == 2,
                "wh must be a float64 tensor of shape [K, 2], got ", wh.scalar_type(), " ", shape_of(wh));
  FASTDET_CHECK(is_floating(dtype), "dtype must be a floating-point dtype, got ", dtype);
  FASTDET_CHECK(std::isfinite(offset), "offset must be finite, got ", offset);
  check_levels(priors_per_level, grid_sizes, strides, wh.size(0), "wh");
  return call_op<Tensor>("fastdet::_grid_priors_kernel", aten::contiguous(wh), priors_per_level, grid_sizes, strides,
                         offset, xyxy, dtype);
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
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
  // Per-backend kernels: the same arguments, validated, with the cell table contiguous (see anchors.h).
  m.def("_grid_anchors_kernel(Tensor cell_anchors, int[] anchors_per_level, int[] grid_sizes, float[] strides, "
        "float offset) -> Tensor");
  m.def("_ssd_default_boxes_kernel(Tensor wh_pairs, int[] boxes_per_level, int[] grid_sizes, float[] divisors, "
        "int[] image_size, ScalarType dtype) -> Tensor");
  m.def("_grid_priors_kernel(Tensor wh, int[] priors_per_level, int[] grid_sizes, float[] strides, float offset, "
        "bool xyxy, ScalarType dtype) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("grid_anchors", TORCH_BOX(&fastdet::grid_anchors));
  m.impl("ssd_default_boxes", TORCH_BOX(&fastdet::ssd_default_boxes));
  m.impl("grid_priors", TORCH_BOX(&fastdet::grid_priors));
}
