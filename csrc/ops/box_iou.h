#pragma once
// The pairwise IoU family (IoU, GIoU, DIoU, CIoU). Public ops (schema file box_iou.cpp): pairwise_box_iou and
// _pairwise_box_iou_backward check their arguments once and call the per-backend kernels
//   _pairwise_box_iou_kernel(boxes1 [B, N, 4], boxes2 [B, M, 4], variant, eps) -> [B, N, M]
//   _pairwise_box_iou_backward_kernel(grad [B, N, M], boxes1, boxes2, variant, eps) -> ([B, N, 4], [B, M, 4])
// with every tensor contiguous, on one device, in the accumulation dtype (float32 or float64).
#include "ops/stable.h"
