#pragma once
// COCO evaluation (pycocotools' COCOeval.evaluate + accumulate for "bbox" and "segm") as two ops. CPU only: the work
// is irregular (greedy matching per image and category, run-length mask intersection, a stable sort per category)
// and its inputs come from Python dicts on the host, so there is no CUDA kernel; the ops are registered for CPU.
//
// Layout (CSR). Annotations are grouped by (category, image): a group is one evaluateImg() call of pycocotools, and
// groups are ordered category-major, then by image, so the groups of one category are contiguous. Within a group,
// ground truth and detections keep the order pycocotools sees them in (dataset order).
//
//   _coco_evaluate_kernel(gt_boxes [G, 4] f64 (x, y, w, h), gt_areas [G] f64, gt_crowd [G] u8, gt_ids [G] f64,
//                         gt_offsets [S + 1] i64, dt_boxes [D, 4] f64, dt_areas [D] f64, dt_scores [D] f64,
//                         dt_ids [D] f64, dt_offsets [S + 1] i64, iou_thresholds [T] f64, area_ranges [A, 2] f64,
//                         max_dets, gt_rle_bytes [Bg] u8?, gt_rle_index [G, 4] i64?, dt_rle_bytes [Bd] u8?,
//                         dt_rle_index [D, 4] i64?, return_matches)
//     -> (dt_order [D] i64, codes [A, T, D] u8, gt_valid [A, S] i64, matched_gt [A, T, D] i64 or [0] i64)
//   With RLE inputs (iouType "segm") the IoU is the mask IoU of the compressed RLE strings; rle_index rows are
//   (byte begin, byte end, height, width) into rle_bytes; the boxes are then unused.
//   dt_order: position p of group s (dt_offsets[s] <= p < dt_offsets[s + 1]) holds the input index of the detection
//   of rank p - dt_offsets[s] in the group's score order (pycocotools' stable descending sort). codes[a, t, p], for
//   ranks below max_dets: bit 0 = matched (pycocotools' dtMatches != 0), bit 1 = ignored (dtIgnore). gt_valid[a, s]:
//   the group's ground truth not ignored in area range a (pycocotools' gtIgnore == 0).
//   matched_gt (only with return_matches, else empty): matched_gt[a, t, p] is the ground-truth row (an index into
//   gt_boxes etc.) the detection at position p was matched to, -1 if none or beyond max_dets. It is the row behind
//   pycocotools' dtMatches (which holds that row's id: dtMatches = gt_ids[matched_gt], 0 where -1), except that a
//   ground truth with id 0 reads as "no match" in dtMatches and in bit 0 of codes but is reported here.
//
//   _coco_accumulate_kernel(dt_scores [D] f64, dt_order [D] i64, codes [A, T, D] u8, dt_offsets [S + 1] i64,
//                           category_offsets [K + 1] i64, gt_valid [A, S] i64, max_dets [M] i64 (ascending),
//                           recall_thresholds [R] f64)
//     -> (precision [T, R, K, A, M] f64, recall [T, K, A, M] f64, scores [T, R, K, A, M] f64)
//   category_offsets[k] .. category_offsets[k + 1] are the groups of category k.
#include "ops/stable.h"
