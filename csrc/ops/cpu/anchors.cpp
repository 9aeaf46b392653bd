// CPU kernels of the grid generators: one parallel loop over output rows; each chunk locates its first row from the
// index alone (see anchors::locate) and steps through the rest (anchors::for_each_row), so chunks are independent
// and the result does not depend on the thread count.
//
// The kernels receive prepared arguments (see anchors.h): a contiguous cell table and a validated level description.
#include <type_traits>

#include "ops/anchors.h"

namespace fastdet {
namespace {

using DoubleArrayRef = torch::headeronly::HeaderOnlyArrayRef<double>;

constexpr int64_t kGrain = 4096;

Tensor grid_anchors_kernel(const Tensor& table, IntArrayRef anchors_per_level, IntArrayRef grid_sizes,
                           DoubleArrayRef strides, double offset) {
  const auto lv = anchors::build_levels(anchors_per_level, grid_sizes, strides);
  const int64_t N = lv.start[lv.num_levels];
  auto out = aten::empty({N, 4}, table.scalar_type(), table);
  if (N == 0) return out;
  FASTDET_DISPATCH_FLOATING(out.scalar_type(), "grid_anchors_cpu", [&] {
    const scalar_t* base = table.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
        anchors::grid_anchor_row<scalar_t>(lv, base, offset, c, dst + n * 4);
      });
    });
  });
  return out;
}

Tensor ssd_default_boxes_kernel(const Tensor& table, IntArrayRef boxes_per_level, IntArrayRef grid_sizes,
                                DoubleArrayRef divisors, IntArrayRef image_size, ScalarType dtype) {
  const auto lv = anchors::build_levels(boxes_per_level, grid_sizes, divisors);
  const int64_t N = lv.start[lv.num_levels];
  const auto out_dtype = anchors::ssd_output_dtype(dtype);
  auto out = aten::empty({N, 4}, out_dtype, table);
  if (N == 0) return out;
  const float* wh = table.const_data_ptr<float>();
  FASTDET_DISPATCH_FLOATING(dtype, "ssd_default_boxes_cpu", [&] {
    using T = scalar_t;
    auto run = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      const O w = static_cast<O>(image_size[1]), h = static_cast<O>(image_size[0]);
      parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
        anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
          anchors::ssd_default_box_row<T, O>(lv, wh, w, h, c, dst + n * 4);
        });
      });
    };
    if (out_dtype == kDouble) {
      run(out.mutable_data_ptr<double>());
    } else {
      run(out.mutable_data_ptr<float>());
    }
  });
  return out;
}

Tensor grid_priors_kernel(const Tensor& table, IntArrayRef priors_per_level, IntArrayRef grid_sizes,
                          DoubleArrayRef strides, double offset, bool xyxy, ScalarType dtype) {
  const auto lv = anchors::build_levels(priors_per_level, grid_sizes, strides);
  const int64_t N = lv.start[lv.num_levels];
  auto out = aten::empty({N, 4}, dtype, table);
  if (N == 0) return out;
  FASTDET_DISPATCH_FLOATING(out.scalar_type(), "grid_priors_cpu", [&] {
    const double* src = table.const_data_ptr<double>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
        anchors::grid_prior_row<scalar_t>(lv, src, offset, xyxy, c, dst + n * 4);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("_grid_anchors_kernel", TORCH_BOX(&fastdet::grid_anchors_kernel));
  m.impl("_ssd_default_boxes_kernel", TORCH_BOX(&fastdet::ssd_default_boxes_kernel));
  m.impl("_grid_priors_kernel", TORCH_BOX(&fastdet::grid_priors_kernel));
}
