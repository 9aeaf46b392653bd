#pragma once
// The aligned-pair IoU losses (GIoU, DIoU, CIoU). Public ops (schema file box_losses.cpp): box_pair_loss and
// _box_pair_loss_backward check their arguments once and call the per-backend kernels
//   _box_pair_loss_kernel(boxes1 [P, 4], boxes2 [P, 4], variant, reduction, eps) -> [P] ('none') or []
//   _box_pair_loss_backward_kernel(grad [P] or [1], boxes1 [P, 4], boxes2 [P, 4], variant, reduction, eps)
//       -> ([P, 4], [P, 4])
// with every tensor contiguous, on one device, in the accumulation dtype (float32 for float16/bfloat16/float32,
// float64 for float64); P is the number of aligned pairs. The composites view the results as the caller's shapes and
// cast the box gradients back to the boxes' dtype.
#include "ops/stable.h"
