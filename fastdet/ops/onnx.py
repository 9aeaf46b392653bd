"""ONNX translations of fastdet's ops for ``torch.onnx.export`` (the dynamo exporter, ``dynamo=True``).

Graphs that call :func:`fastdet.ops.nms`, :func:`~fastdet.ops.batched_nms`, :func:`~fastdet.ops.nms_fixed` (and so
:func:`~fastdet.ops.multiclass_nms`, which is built on it), :func:`~fastdet.ops.roi_align`,
:func:`~fastdet.ops.multi_scale_roi_align`, the anchor generators and the box decoders (``box_decode``,
``decode_and_select``) export to standard ONNX operators (``NonMaxSuppression``, ``RoiAlign``, ``TopK`` and plain
arithmetic), so whole detectors export, so onnxruntime or TensorRT can run
them without a custom-op library.

Registration needs nothing from the user: importing :mod:`fastdet.ops` arranges for these translations to be added to
the exporter's registry the first time the exporter loads it (the exporter itself, and onnxscript, are only imported
then, so ``import fastdet`` stays fast). That uses a private hook of torch's exporter; should a future torch change
it, pass the public argument instead::

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=fastdet.ops.onnx_translation_table())

Where ONNX cannot say exactly what the eager op does, the exported graph differs as follows (each is tested):

* Boxes and scores are computed in float32 (ONNX's ``NonMaxSuppression`` only takes float32). float16/bfloat16
  inputs decide exactly as in eager mode, which also computes in float32; float64 inputs may decide differently for
  IoUs within float32 rounding of the threshold.
* ``batched_nms``, ``nms_fixed`` with categories, and ``multiclass_nms``: a box whose score is -inf or NaN is never
  kept (eager keeps it when nothing suppresses it; ``multiclass_nms`` drops such candidates in eager mode too).
  With one category (``nms``, ``nms_fixed`` without ``idxs``) -inf scores behave as in eager mode; NaN scores are
  visited in an unspecified order.
* The order of kept boxes, tie-breaking included (equal scores: lower index first), is eager's.
* ``multiclass_nms`` ranks candidates with a stable sort, which torch's exporter cannot translate; fastdet adds a
  translation of ``aten::sort.stable`` (a full ONNX ``TopK``, whose tie rule is a stable sort's) when torch has none.
  NaN scores are unspecified there as in ``nms``.
* ``roi_align`` / ``multi_scale_roi_align``: ONNX's ``RoiAlign`` has no "adaptive" sampling ratio with a cap, so
  ``sampling_ratio <= 0`` exports as ONNX's adaptive mode (``ceil(roi_size / output_size)`` samples, as eager) and an
  explicit ratio as itself. The output matches eager to float rounding (summation order differs).

``roi_pool`` has no translation: its op also returns the argmax indices its backward needs, which ONNX's
``MaxRoiPool`` cannot produce, and exporting a placeholder for them would be silently wrong.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys

import numpy

__all__ = ["onnx_translation_table"]

_INT64_MAX = 2**63 - 1
_LOWEST_FLOAT32 = float(numpy.finfo(numpy.float32).min)


def _op():
    from onnxscript import opset18

    return opset18


def _ints(values):
    return _op().Constant(value_ints=list(values))


def _float_threshold(threshold: float) -> float:
    """The largest float32 not above ``threshold``: ``iou > t`` in float32 then decides exactly as the native kernels,
    which compare a float IoU with the double threshold (see nms_math.h ``threshold_as_float``)."""
    t = numpy.float32(threshold)
    if float(t) > threshold:
        t = numpy.nextafter(t, numpy.float32(-numpy.inf))
    return float(t)


def _sanitized_boxes(boxes):
    """float32 boxes where every box that cannot overlap anything in the native kernels (x2 < x1, y2 < y1 or NaN
    coordinates: their intersection with any box is empty or their IoU is NaN) becomes ``(0, 0, 0, 0)``. ONNX's
    ``NonMaxSuppression`` would instead reorder flipped corners into a valid box, and it never lets a box of area 0
    suppress or be suppressed — the native kernels' behaviour for such boxes too."""
    op = _op()
    boxes = op.Cast(boxes, to=1)  # FLOAT
    x1 = op.Slice(boxes, _ints([0]), _ints([1]), _ints([-1]))
    y1 = op.Slice(boxes, _ints([1]), _ints([2]), _ints([-1]))
    x2 = op.Slice(boxes, _ints([2]), _ints([3]), _ints([-1]))
    y2 = op.Slice(boxes, _ints([3]), _ints([4]), _ints([-1]))
    # GreaterOrEqual is false for NaN, so NaN boxes are invalid as well.
    valid = op.And(op.GreaterOrEqual(x2, x1), op.GreaterOrEqual(y2, y1))
    return op.Where(valid, boxes, op.Constant(value_float=0.0))


def _selected_positions(selected_batch, num_batches):
    """For ONNX NMS output rows sorted by batch: each row's position within its batch and each batch's row count."""
    op = _op()
    batches = op.Range(op.Constant(value_int=0), num_batches, op.Constant(value_int=1))
    one_hot = op.Cast(op.Equal(op.Unsqueeze(selected_batch, _ints([1])), op.Unsqueeze(batches, _ints([0]))), to=7)
    counts = op.ReduceSum(one_hot, _ints([0]), keepdims=0)  # [B]
    starts = op.CumSum(counts, op.Constant(value_int=0), exclusive=1)
    rows = op.Range(op.Constant(value_int=0), op.Shape(selected_batch), op.Constant(value_int=1))
    return op.Sub(rows, op.Gather(starts, selected_batch)), counts


def _keep_single_category(boxes3, scores3, iou_threshold):
    """One category: ONNX NMS visits boxes by decreasing score, ties by lower index, as the native kernels do, so its
    output rows (batch by batch) are already in eager's order. Returns (batch, box) columns of the kept rows."""
    op = _op()
    scores = op.Unsqueeze(op.Cast(scores3, to=1), _ints([1]))  # [B, 1, N]
    selected = op.NonMaxSuppression(
        boxes3,
        scores,
        op.Constant(value_ints=[_INT64_MAX]),
        op.Constant(value_floats=[_float_threshold(iou_threshold)]),
    )
    batch = op.Reshape(op.Slice(selected, _ints([0]), _ints([1]), _ints([1])), _ints([-1]))
    box = op.Reshape(op.Slice(selected, _ints([2]), _ints([3]), _ints([1])), _ints([-1]))
    return batch, box


def _kept_mask_by_category(boxes3, scores3, categories2, iou_threshold):
    """Several categories: ONNX NMS's class axis holds one row per distinct category, where boxes of other
    categories get the score -inf and the score threshold (the lowest float32, compared with ``>``) removes them
    before any suppression. Returns the kept mask ``[B, N]``."""
    op = _op()
    shape = op.Shape(categories2)
    distinct, _, inverse, _ = op.Unique(op.Reshape(categories2, _ints([-1])), sorted=1)
    dense = op.Reshape(inverse, shape)  # [B, N] in 0..U-1
    num_categories = op.Shape(distinct)
    classes = op.Range(op.Constant(value_int=0), op.Squeeze(num_categories, _ints([0])), op.Constant(value_int=1))
    member = op.Equal(op.Unsqueeze(dense, _ints([1])), op.Unsqueeze(classes, _ints([0, 2])))  # [B, U, N]
    scores = op.Cast(scores3, to=1)
    per_class = op.Where(member, op.Unsqueeze(scores, _ints([1])), op.Constant(value_float=-math.inf))
    selected = op.NonMaxSuppression(
        boxes3,
        per_class,
        op.Constant(value_ints=[_INT64_MAX]),
        op.Constant(value_floats=[_float_threshold(iou_threshold)]),
        op.Constant(value_floats=[_LOWEST_FLOAT32]),
    )
    batch_box = op.Concat(
        op.Slice(selected, _ints([0]), _ints([1]), _ints([1])),
        op.Slice(selected, _ints([2]), _ints([3]), _ints([1])),
        axis=1,
    )
    zeros = op.Cast(op.ConstantOfShape(op.Shape(dense)), to=9)  # BOOL [B, N]
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(batch_box, start=0, end=1))
    return op.Cast(op.ScatterND(op.Cast(zeros, to=7), batch_box, ones), to=9), scores


def _order_kept(kept, scores):
    """Kept boxes of each image by decreasing score, ties by lower index (ONNX TopK breaks ties by lower index), and
    their count. Unkept entries sort last (-inf key); kept scores are all > -inf here."""
    op = _op()
    key = op.Where(kept, scores, op.Constant(value_float=-math.inf))
    n = op.Shape(key, start=1, end=2)
    _, order = op.TopK(key, n, axis=1, largest=1, sorted=1)
    count = op.ReduceSum(op.Cast(kept, to=7), _ints([1]), keepdims=0)
    return order, count


def _pad_to(keep, width, fill):
    """``keep [B, L]`` cut or padded with ``fill`` to ``[B, width]``."""
    op = _op()
    length = op.Shape(keep, start=1, end=2)
    cut = op.Slice(keep, _ints([0]), op.Min(length, _ints([width])), _ints([1]))
    missing = op.Max(op.Sub(_ints([width]), length), _ints([0]))
    pads = op.Concat(_ints([0, 0, 0]), missing, axis=0)
    return op.Pad(cut, pads, op.Constant(value_int=fill))


def _nms(boxes, scores, iou_threshold: float):
    op = _op()
    boxes3 = op.Unsqueeze(_sanitized_boxes(boxes), _ints([0]))
    _, box = _keep_single_category(boxes3, op.Unsqueeze(scores, _ints([0])), iou_threshold)
    return box


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    op = _op()
    boxes3 = op.Unsqueeze(_sanitized_boxes(boxes), _ints([0]))
    kept, scores32 = _kept_mask_by_category(
        boxes3, op.Unsqueeze(scores, _ints([0])), op.Unsqueeze(idxs, _ints([0])), iou_threshold
    )
    order, count = _order_kept(kept, scores32)
    return op.Slice(op.Squeeze(order, _ints([0])), _ints([0]), count, _ints([0]))


def _nms_fixed(boxes, scores, idxs, iou_threshold: float, max_output: int):
    op = _op()
    batched = len(boxes.shape) == 3
    boxes3 = _sanitized_boxes(boxes if batched else op.Unsqueeze(boxes, _ints([0])))
    scores2 = scores if batched else op.Unsqueeze(scores, _ints([0]))
    if idxs is None:
        batch, box = _keep_single_category(boxes3, scores2, iou_threshold)
        position, count = _selected_positions(batch, op.Squeeze(op.Shape(scores2, start=0, end=1), _ints([0])))
        # Scatter each kept box to (image, position) of a [B, N] buffer of -1, then cut/pad to max_output.
        buffer = op.Expand(op.Constant(value_ints=[-1]), op.Shape(scores2))
        where = op.Concat(op.Unsqueeze(batch, _ints([1])), op.Unsqueeze(position, _ints([1])), axis=1)
        keep = op.ScatterND(buffer, where, box)
    else:
        categories2 = idxs if batched else op.Unsqueeze(idxs, _ints([0]))
        kept, scores32 = _kept_mask_by_category(boxes3, scores2, categories2, iou_threshold)
        order, count = _order_kept(kept, scores32)
        n = op.Shape(order, start=1, end=2)
        positions = op.Range(op.Constant(value_int=0), op.Squeeze(n, _ints([0])), op.Constant(value_int=1))
        keep = op.Where(op.Less(op.Unsqueeze(positions, _ints([0])), op.Unsqueeze(count, _ints([1]))), order,
                        op.Constant(value_int=-1))
    keep = _pad_to(keep, max_output, -1)
    count = op.Min(count, op.Constant(value_int=max_output))
    if not batched:
        keep = op.Squeeze(keep, _ints([0]))
        count = op.Squeeze(count, _ints([0]))
    return keep, count


def _roi_align_one(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    op = _op()
    batch_indices = op.Cast(op.Reshape(op.Slice(rois, _ints([0]), _ints([1]), _ints([1])), _ints([-1])), to=7)
    coords = op.CastLike(op.Slice(rois, _ints([1]), _ints([5]), _ints([1])), input)
    return op.RoiAlign(
        input,
        coords,
        batch_indices,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=int(pooled_height),
        output_width=int(pooled_width),
        sampling_ratio=max(int(sampling_ratio), 0),
        spatial_scale=float(spatial_scale),
    )


def _roi_align(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
               aligned: bool):
    return _roi_align_one(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _multi_scale_roi_align(features, rois, levels, spatial_scales, pooled_height: int, pooled_width: int,
                           sampling_ratio: int, aligned: bool):
    """Each level pools only its own RoIs (gathered with NonZero) and scatters them back into the output."""
    op = _op()
    result = None
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        rows = op.NonZero(op.Equal(levels, op.Constant(value_int=level)))  # [1, K_l]
        rows = op.Reshape(rows, _ints([-1, 1]))
        pooled = _roi_align_one(feature, op.GatherND(rois, rows), scale, pooled_height, pooled_width,
                                sampling_ratio, aligned)
        if result is None:
            k = op.Shape(rois, start=0, end=1)
            shape = op.Concat(k, op.Shape(feature, start=1, end=2), _ints([int(pooled_height), int(pooled_width)]),
                              axis=0)
            result = op.Expand(op.CastLike(op.Constant(value_float=0.0), feature), shape)
        result = op.ScatterND(result, rows, pooled)
    return result



def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten::sort.stable`` (which the exporter lacks; multiclass_nms' candidate ranking uses it) as a full ONNX
    TopK: TopK's specified tie rule (lower index first) is exactly a stable sort's, ascending or descending."""
    op = _op()
    rank = len(self.shape)
    axis = dim % rank if rank else 0
    n = op.Shape(self, start=axis, end=axis + 1)
    values, indices = op.TopK(self, n, axis=axis, largest=1 if descending else 0, sorted=1)
    return values, indices


# ---- anchors and box coding: what a whole detector needs besides NMS and RoIAlign -------------------------------
# The grid geometry (sizes, strides, offsets) is static in every exported graph, so the per-cell shifts / centres are
# computed here with numpy in exactly the native kernels' arithmetic (anchors.h) and embedded as constants; only the
# cell tables, which are model buffers, stay graph inputs. Anchors are then bit-identical to eager.

_FLOAT, _DOUBLE = 1, 11  # ONNX TensorProto data types


def _np_dtype(value):
    return value.dtype.numpy()


def _const(array):
    from onnxscript import ir

    return _op().Constant(value=ir.tensor(numpy.ascontiguousarray(array)))


def _torch_dtype(dtype):
    """A ScalarType argument as the exporter passes it: an ONNX data type (the exporter converts torch dtypes), or a
    torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {10: torch.float16, _FLOAT: torch.float32, _DOUBLE: torch.float64, 16: torch.bfloat16}
    return table[int(dtype)]


def _grid_xy(h: int, w: int):
    """Row-major (y, then x) cell coordinates of an h x w grid, as float64 columns."""
    ys, xs = numpy.meshgrid(numpy.arange(h, dtype=numpy.float64), numpy.arange(w, dtype=numpy.float64), indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def _round_to(values, dtype):
    """anchors.h round_to: float16/bfloat16 through float32."""
    if numpy.dtype(dtype) == numpy.float64:
        return values
    return values.astype(numpy.float32).astype(dtype)


def _grid_anchors(cell_anchors, anchors_per_level, grid_sizes, strides, offset: float):
    op = _op()
    dtype = _np_dtype(cell_anchors)
    acc = numpy.float64 if dtype == numpy.float64 else numpy.float32
    pieces, row = [], 0
    for level, count in enumerate(anchors_per_level):
        h, w = int(grid_sizes[2 * level]), int(grid_sizes[2 * level + 1])
        xs, ys = _grid_xy(h, w)
        sx = _round_to((xs + offset) * float(strides[2 * level + 1]), dtype).astype(acc)
        sy = _round_to((ys + offset) * float(strides[2 * level]), dtype).astype(acc)
        shifts = _const(numpy.stack([sx, sy, sx, sy], axis=1).reshape(-1, 1, 4))
        table = op.Cast(op.Slice(cell_anchors, _ints([row]), _ints([row + count]), _ints([0])),
                        to=_DOUBLE if acc == numpy.float64 else _FLOAT)
        level_anchors = op.Add(shifts, op.Unsqueeze(table, _ints([0])))  # [HW, A, 4], rounded once in acc
        pieces.append(op.CastLike(op.Reshape(level_anchors, _ints([-1, 4])), cell_anchors))
        row += count
    return pieces[0] if len(pieces) == 1 else op.Concat(*pieces, axis=0)


def _ssd_default_boxes(wh_pairs, boxes_per_level, grid_sizes, divisors, image_size, dtype):
    import torch

    op = _op()
    feature = _torch_dtype(dtype)
    out = numpy.float64 if feature == torch.float64 else numpy.float32
    feature_np = {torch.float16: numpy.float16, torch.float32: numpy.float32, torch.float64: numpy.float64}.get(
        feature, numpy.float32)
    image_h, image_w = float(image_size[0]), float(image_size[1])
    scale = _const(numpy.array([image_w, image_h, image_w, image_h], dtype=out))
    pieces, row = [], 0
    for level, count in enumerate(boxes_per_level):
        h, w = int(grid_sizes[2 * level]), int(grid_sizes[2 * level + 1])
        xs, ys = _grid_xy(h, w)
        fx = (xs.astype(numpy.float32) + numpy.float32(0.5)) / numpy.float32(divisors[2 * level + 1])
        fy = (ys.astype(numpy.float32) + numpy.float32(0.5)) / numpy.float32(divisors[2 * level])
        if feature == torch.bfloat16:  # no numpy bfloat16 here: round through torch
            fx = torch.from_numpy(fx).bfloat16().float().numpy()
            fy = torch.from_numpy(fy).bfloat16().float().numpy()
        else:
            fx, fy = fx.astype(feature_np), fy.astype(feature_np)
        centres = _const(numpy.stack([fx, fy], axis=1).astype(out).reshape(-1, 1, 2))
        half = op.Mul(op.Cast(op.Slice(wh_pairs, _ints([row]), _ints([row + count]), _ints([0])),
                              to=_DOUBLE if out == numpy.float64 else _FLOAT),
                      _const(numpy.array(0.5, dtype=out)))
        half = op.Unsqueeze(half, _ints([0]))  # [1, P, 2]
        corners = op.Concat(op.Sub(centres, half), op.Add(centres, half), axis=2)  # [HW, P, 4]
        pieces.append(op.Reshape(op.Mul(corners, scale), _ints([-1, 4])))
        row += count
    return pieces[0] if len(pieces) == 1 else op.Concat(*pieces, axis=0)


def _grid_priors(wh, priors_per_level, grid_sizes, strides, offset: float, xyxy: bool, dtype):
    import torch

    op = _op()
    target = {torch.float16: 10, torch.float32: _FLOAT, torch.float64: _DOUBLE, torch.bfloat16: 16}[_torch_dtype(dtype)]
    pieces, row = [], 0
    for level, count in enumerate(priors_per_level):
        h, w = int(grid_sizes[2 * level]), int(grid_sizes[2 * level + 1])
        xs, ys = _grid_xy(h, w)
        cx = (xs + offset) * float(strides[2 * level + 1])
        cy = (ys + offset) * float(strides[2 * level])
        centres = _const(numpy.stack([cx, cy], axis=1).reshape(-1, 1, 2))  # float64
        sizes = op.Unsqueeze(op.Cast(op.Slice(wh, _ints([row]), _ints([row + count]), _ints([0])), to=_DOUBLE),
                             _ints([0]))  # [1, P, 2]
        if xyxy:
            half = op.Mul(sizes, _const(numpy.array(0.5)))
            rows = op.Concat(op.Sub(centres, half), op.Add(centres, half), axis=2)
        else:
            rows = op.Concat(op.Expand(centres, op.Concat(op.Shape(centres, start=0, end=1), op.Shape(sizes, start=1),
                                                          axis=0)),
                             op.Expand(sizes, op.Concat(op.Shape(centres, start=0, end=1), op.Shape(sizes, start=1),
                                                        axis=0)), axis=2)
        rows = op.Reshape(rows, _ints([-1, 4]))
        if target != _DOUBLE:
            rows = op.Cast(rows, to=_FLOAT)  # round_to: through float32
        pieces.append(op.Cast(rows, to=target))
        row += count
    return pieces[0] if len(pieces) == 1 else op.Concat(*pieces, axis=0)


def _acc_type(x):
    return _DOUBLE if _np_dtype(x) == numpy.float64 else _FLOAT


def _decode(rel, boxes, weights, clip, acc):
    """box_coder.h decode on [..., 4] deltas and matching [..., 4] boxes, in acc (each ONNX op rounds once, as the
    kernel's explicitly rounded operations). exp is onnxruntime's: within an ulp or two of torch's."""
    op = _op()
    np_acc = numpy.float64 if acc == _DOUBLE else numpy.float32

    def col(t, i):
        return op.Slice(t, _ints([i]), _ints([i + 1]), _ints([-1]))

    def c(v):
        return _const(numpy.array(v, dtype=np_acc))

    x1, y1, x2, y2 = (col(boxes, i) for i in range(4))
    w, h = op.Sub(x2, x1), op.Sub(y2, y1)
    cx, cy = op.Add(x1, op.Mul(c(0.5), w)), op.Add(y1, op.Mul(c(0.5), h))
    dx, dy = op.Div(col(rel, 0), c(weights[0])), op.Div(col(rel, 1), c(weights[1]))
    dw, dh = op.Div(col(rel, 2), c(weights[2])), op.Div(col(rel, 3), c(weights[3]))
    limit = c(clip)
    dw = op.Where(op.Greater(dw, limit), limit, dw)  # NaN stays NaN, as the kernel's comparison
    dh = op.Where(op.Greater(dh, limit), limit, dh)
    pcx, pcy = op.Add(op.Mul(dx, w), cx), op.Add(op.Mul(dy, h), cy)
    hw, hh = op.Mul(c(0.5), op.Mul(op.Exp(dw), w)), op.Mul(c(0.5), op.Mul(op.Exp(dh), h))
    return op.Concat(op.Sub(pcx, hw), op.Sub(pcy, hh), op.Add(pcx, hw), op.Add(pcy, hh), axis=-1)


def _box_decode(rel_codes, boxes, weights, bbox_xform_clip: float):
    """rel_codes [R, 4C], boxes [Rb, 4]; row r uses box r % Rb."""
    op = _op()
    acc = _acc_type(rel_codes)
    rel = op.Cast(rel_codes, to=acc)
    ref = op.Cast(op.CastLike(boxes, rel_codes), to=acc)
    r = op.Shape(rel, start=0, end=1)
    repeats = op.Div(r, op.Shape(ref, start=0, end=1))
    ref = op.Tile(ref, op.Concat(repeats, _ints([1]), axis=0))  # [R, 4]
    rel4 = op.Reshape(rel, op.Concat(r, _ints([-1, 4]), axis=0))  # [R, C, 4]
    out = _decode(rel4, op.Unsqueeze(ref, _ints([1])), weights, bbox_xform_clip, acc)
    return op.CastLike(op.Reshape(out, op.Concat(r, _ints([-1]), axis=0)), rel_codes)


def _decode_select_boxes(rel_codes, anchors, index, image_sizes, weights, bbox_xform_clip: float):
    """rel_codes [B, N, 4], anchors [Ba, N, 4], index [B, K] (-1 = padding) -> [B, K, 4]; padding rows are zero."""
    op = _op()
    acc = _acc_type(rel_codes)
    safe = op.Unsqueeze(op.Max(index, op.Constant(value_int=0)), _ints([-1]))
    gather_at = op.Expand(safe, op.Concat(op.Shape(index), _ints([4]), axis=0))
    rel = op.Cast(op.GatherElements(rel_codes, gather_at, axis=1), to=acc)
    batch = op.Shape(rel_codes, start=0, end=1)
    anchors_b = op.Expand(anchors, op.Concat(batch, op.Shape(anchors, start=1), axis=0))
    ref = op.Cast(op.GatherElements(op.CastLike(anchors_b, rel_codes), gather_at, axis=1), to=acc)
    out = _decode(rel, ref, weights, bbox_xform_clip, acc)
    if image_sizes is not None:
        sizes = op.Cast(image_sizes, to=acc)  # [B, 2] (height, width)
        h = op.Unsqueeze(op.Slice(sizes, _ints([0]), _ints([1]), _ints([1])), _ints([1]))
        w = op.Unsqueeze(op.Slice(sizes, _ints([1]), _ints([2]), _ints([1])), _ints([1]))
        upper = op.Concat(w, h, w, h, axis=-1)  # [B, 1, 4]
        zero = op.CastLike(op.Constant(value_float=0.0), out)
        out = op.Where(op.Less(out, zero), zero, out)
        out = op.Where(op.Greater(out, upper), op.Expand(upper, op.Shape(out)), out)
    out = op.Where(op.Unsqueeze(op.Less(index, op.Constant(value_int=0)), _ints([-1])),
                   op.CastLike(op.Constant(value_float=0.0), out), out)
    return op.CastLike(out, rel_codes)


# op name -> translation. The schema of each op is in csrc/ops/<family>.cpp.
_TRANSLATIONS = {
    "nms": _nms,
    "batched_nms": _batched_nms,
    "nms_fixed": _nms_fixed,
    "roi_align": _roi_align,
    "multi_scale_roi_align": _multi_scale_roi_align,
    "grid_anchors": _grid_anchors,
    "ssd_default_boxes": _ssd_default_boxes,
    "grid_priors": _grid_priors,
    "box_decode": _box_decode,
    "_decode_select_boxes": _decode_select_boxes,
}


def onnx_translation_table(include_sort: bool = True) -> dict:
    """``{torch.ops.fastdet.<op>.default: translation}`` for ``torch.onnx.export(...,
    custom_translation_table=...)``. Only needed if the automatic registration (see the module docstring) is
    unavailable; ops the compiled extension does not define are left out. ``include_sort`` adds the translation of
    ``aten::sort.stable`` that ``multiclass_nms`` needs."""
    import torch

    from fastdet.ops._registry import _defined

    table = {getattr(torch.ops.fastdet, name).default: fn for name, fn in _TRANSLATIONS.items() if _defined(name)}
    if include_sort:
        table[torch.ops.aten.sort.stable] = _sort_stable
    return table


# torch's exporter builds its default registry from the list that `onnx_impl` (in _TORCHLIB) appends to. _TORCHLIB
# and _REGISTRATION import each other, so registration waits until both have finished executing.
_TORCHLIB = "torch.onnx._internal.exporter._torchlib._torchlib_registry"
_REGISTRATION = "torch.onnx._internal.exporter._registration"
_registered = False


def _try_register() -> bool:
    """Add the translations to the exporter's list once both of its modules are fully loaded; True when done."""
    global _registered
    if _registered:
        return True
    torchlib = sys.modules.get(_TORCHLIB)
    registration = sys.modules.get(_REGISTRATION)
    if not (hasattr(torchlib, "get_torchlib_ops") and hasattr(registration, "ONNXRegistry")):
        return False
    _registered = True
    for target, fn in onnx_translation_table(include_sort=False).items():
        torchlib.onnx_impl(target, trace_only=True)(fn)
    # A stable sort only where torch's exporter has none of its own (it had none up to torch 2.14).
    import torch
    from torch.onnx._internal.exporter._torchlib import ops  # noqa: F401  (fills the list with torch's own entries)

    sort_stable = torch.ops.aten.sort.stable
    if not any(getattr(meta, "fx_target", None) == sort_stable for meta in getattr(torchlib, "_registry", ())):
        torchlib.onnx_impl(sort_stable, trace_only=True)(_sort_stable)
    return True


class _ExporterHook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers the translations right after torch's exporter registry modules are first imported (they import
    onnxscript, which takes seconds: too slow to do at ``import fastdet``)."""

    def __init__(self):
        self._loaders = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_TORCHLIB, _REGISTRATION):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders[module.__spec__.name].exec_module(module)
        try:
            done = _try_register()
        except Exception as error:  # never break the exporter's import; the explicit table still works
            import warnings

            done = True
            warnings.warn(f"fastdet could not register its ONNX translations automatically ({error}); pass "
                          "custom_translation_table=fastdet.ops.onnx_translation_table() to torch.onnx.export",
                          stacklevel=2)
        if done:
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]


def install() -> None:
    """Arrange the automatic registration (called by ``import fastdet.ops``)."""
    if importlib.util.find_spec("onnxscript") is None:
        return
    if not _try_register() and not any(isinstance(f, _ExporterHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ExporterHook())
