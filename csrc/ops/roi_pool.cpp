// Schema of roi_pool and its registered backward op: argument checks and layout decisions, written once for every
// backend (the checks shared with roi_align live in roi_align.cpp, roi_align.h). The kernels (cpu/roi_pool.cpp,
// cuda/roi_pool.cu) receive prepared tensors only; the bin geometry lives in roi_pool.h.
#include "ops/roi_pool.h"

#include <climits>
#include <cstdint>
#include <tuple>

#include "ops/checks.h"
#include "ops/roi_align.h"

namespace fastdet {
namespace {

std::tuple<Tensor, Tensor> roi_pool(const Tensor& input, const Tensor& rois, double spatial_scale, int64_t PH,
                                    int64_t PW) {
  check_roi_feature(input, "input");
  check_output_size(PH, PW);
  check_spatial_scale(spatial_scale, "spatial_scale");
  const auto r = prepare_rois(rois, input, "input", input.scalar_type());
  const int64_t H = input.size(2), W = input.size(3);
  FASTDET_CHECK(H * W <= INT32_MAX, "roi_pool: feature planes of more than 2^31 - 1 pixels are not supported (argmax ",
                "is an int32 index inside the plane, as in torchvision), got ", H, " x ", W);
  check_batch_indices_on_cpu(r, input.size(0));
  return call_op<std::tuple<Tensor, Tensor>>("fastdet::_roi_pool_kernel", input, r, spatial_scale, PH, PW,
                                             roi_channels_last(input));
}

Tensor roi_pool_backward(const Tensor& grad, const Tensor& rois, const Tensor& argmax, double spatial_scale, int64_t N,
                         int64_t C, int64_t H, int64_t W, bool channels_last, bool deterministic) {
  check_spatial_scale(spatial_scale, "spatial_scale");
  check_map_size(N, "batch_size");
  check_map_size(C, "channels");
  check_map_size(H, "height");
  check_map_size(W, "width");
  const auto r = prepare_rois(rois, grad, "grad", grad.scalar_type());
  check_roi_grad(grad, r, C, grad.dim() == 4 ? grad.size(2) : 0, grad.dim() == 4 ? grad.size(3) : 0);
  FASTDET_CHECK(argmax.scalar_type() == kInt && argmax.sizes().equals(grad.sizes()),
                "argmax must be an int32 tensor shaped like grad ", shape_of(grad), ", got ", argmax.scalar_type(),
                " ", shape_of(argmax));
  check_same_device(grad, "grad", argmax, "argmax");
  check_batch_indices_on_cpu(r, N);
  auto buf = call_op<Tensor>("fastdet::_roi_pool_backward_kernel", grad, r, argmax, spatial_scale, N, C, H, W,
                             channels_last, deterministic);
  return aten::to(buf, grad.scalar_type());
}

}  // namespace
}  // namespace fastdet

STABLE_TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // Returns (output [K, C, PH, PW] in input's dtype and memory format, argmax [K, C, PH, PW] int32 (as torchvision): the index
  // h * W + w of the maximum inside its feature plane, -1 for an empty bin).
  m.def("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)");
  // spatial_scale lets the deterministic CUDA backward skip RoIs that cannot touch a row (see cuda/roi_pool.cu).
  // deterministic selects that CUDA kernel (fastdet.ops.roi passes torch.are_deterministic_algorithms_enabled());
  // the CPU kernel always is.
  m.def("_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width, bool channels_last, bool deterministic=False) -> Tensor");

  // Per-backend kernels (prepared arguments only, see roi_align.h).
  m.def("_roi_pool_kernel(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
        "bool channels_last) -> (Tensor, Tensor)");
  // Returns the input gradient in the accumulation dtype (float32, float64 for float64 grads).
  m.def("_roi_pool_backward_kernel(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, int batch_size, "
        "int channels, int height, int width, bool channels_last, bool deterministic) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(fastdet, CompositeExplicitAutograd, m) {
  m.impl("roi_pool", TORCH_BOX(&fastdet::roi_pool));
  m.impl("_roi_pool_backward", TORCH_BOX(&fastdet::roi_pool_backward));
}
