// CPU kernels of the grid generators: one parallel loop over output rows; each chunk locates its first row from the
// index alone (see anchors::locate) and steps through the rest (anchors::for_each_row), so chunks are independent
// and the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/anchors.h"

namespace fastdet {
namespace {

constexpr int64_t kGrain = 4096;

at::Tensor grid_anchors_cpu(const at::Tensor& cell_anchors, c10::IntArrayRef anchors_per_level,
                            c10::IntArrayRef grid_sizes, c10::ArrayRef<double> strides, double offset) {
  const auto lv = anchors::check_grid_anchors_args(cell_anchors, anchors_per_level, grid_sizes, strides, offset);
  const int64_t N = lv.start[lv.num_levels];
  auto table = cell_anchors.contiguous();
  auto out = at::empty({N, 4}, table.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grid_anchors_cpu", [&] {
    const scalar_t* base = table.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
        anchors::grid_anchor_row<scalar_t>(lv, base, offset, c, dst + n * 4);
      });
    });
  });
  return out;
}

at::Tensor ssd_default_boxes_cpu(const at::Tensor& wh_pairs, c10::IntArrayRef boxes_per_level,
                                 c10::IntArrayRef grid_sizes, c10::ArrayRef<double> divisors,
                                 c10::IntArrayRef image_size, at::ScalarType dtype) {
  const auto lv =
      anchors::check_ssd_default_boxes_args(wh_pairs, boxes_per_level, grid_sizes, divisors, image_size, dtype);
  const int64_t N = lv.start[lv.num_levels];
  auto table = wh_pairs.contiguous();
  const auto out_dtype = anchors::ssd_output_dtype(dtype);
  auto out = at::empty({N, 4}, table.options().dtype(out_dtype));
  if (N == 0) return out;
  const float* wh = table.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ssd_default_boxes_cpu", [&] {
    using T = scalar_t;
    auto run = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      const O w = static_cast<O>(image_size[1]), h = static_cast<O>(image_size[0]);
      at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
        anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
          anchors::ssd_default_box_row<T, O>(lv, wh, w, h, c, dst + n * 4);
        });
      });
    };
    if (out_dtype == at::kDouble) {
      run(out.mutable_data_ptr<double>());
    } else {
      run(out.mutable_data_ptr<float>());
    }
  });
  return out;
}

at::Tensor grid_priors_cpu(const at::Tensor& wh, c10::IntArrayRef priors_per_level, c10::IntArrayRef grid_sizes,
                           c10::ArrayRef<double> strides, double offset, bool xyxy, at::ScalarType dtype) {
  const auto lv = anchors::check_grid_priors_args(wh, priors_per_level, grid_sizes, strides, offset, dtype);
  const int64_t N = lv.start[lv.num_levels];
  auto table = wh.contiguous();
  auto out = at::empty({N, 4}, table.options().dtype(dtype));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grid_priors_cpu", [&] {
    const double* src = table.const_data_ptr<double>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      anchors::for_each_row(lv, begin, end, [&](int64_t n, const anchors::Cell& c) {
        anchors::grid_prior_row<scalar_t>(lv, src, offset, xyxy, c, dst + n * 4);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace fastdet

TORCH_LIBRARY_IMPL(fastdet, CPU, m) {
  m.impl("grid_anchors", &fastdet::grid_anchors_cpu);
  m.impl("ssd_default_boxes", &fastdet::ssd_default_boxes_cpu);
  m.impl("grid_priors", &fastdet::grid_priors_cpu);
}
