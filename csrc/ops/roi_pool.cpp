// Schema of roi_pool and its registered backward op. Argument checks are shared with roi_align (roi_align.h).
#include "ops/roi_pool.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdet, m) {
  // Returns (output [K, C, PH, PW] in input's dtype and memory format, argmax [K, C, PH, PW] int32 (as torchvision): the index
  // h * W + w of the maximum inside its feature plane, -1 for an empty bin).
  m.def("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)");
  // spatial_scale lets the deterministic CUDA backward skip RoIs that cannot touch a row (see cuda/roi_pool.cu).
  m.def("_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width, bool channels_last) -> Tensor");
}
