"""Anchor and prior generators: torchvision's ``AnchorGenerator`` and ``DefaultBoxGenerator`` (SSD), and YOLO-style grid
priors, each producing every pyramid level in one kernel launch.

Order and format of every generator here (torchvision's): boxes are ``(x1, y1, x2, y2)`` in input-image pixels
(YOLO priors may also be ``(cx, cy, w, h)``), listed level by level, within a level row-major over the feature grid
(row ``y``, then column ``x``), and within a grid cell in the order of the level's cell shapes.

Anchor offset. torchvision places the cell anchors of grid cell ``(x, y)`` around ``(x * stride, y * stride)``, the
top-left corner of the cell (``offset=0``, the default here). detectron2's ``DefaultAnchorGenerator(offset=0.5)``
centres them at ``((x + 0.5) * stride, (y + 0.5) * stride)``, the middle of the cell's footprint in the image; pass
``offset=0.5`` for those anchors. YOLO priors are cell centres by definition (``offset=0.5`` there).

Caching. Anchors depend only on the feature-map sizes, the strides, dtype and device, never on image content, so the
generators keep the last few results keyed by exactly those and return the same tensor again; per-image results are
views of it (no copy per image). They must not be modified in place (torchvision's detectors never do): clone
first if you need to. Under ``torch.compile`` the cache is bypassed and the op is traced like any other.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet.ops._registry import native, register_fake

__all__ = ["AnchorGenerator", "DefaultBoxGenerator", "generate_anchors", "ssd_default_boxes", "yolo_grid_priors"]

_MAX_LEVELS = 16  # csrc/ops/anchors.h kMaxLevels


# --------------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------------


def _positive_numbers(values, name: str) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v < math.inf or v <= 0:
            raise ValueError(f"{name} must hold finite positive numbers, got {values!r}")
    return values


def _grid_list(feature_sizes, name: str = "feature_sizes") -> list[tuple]:
    sizes = []
    for s in feature_sizes:
        s = tuple(s)
        if len(s) != 2:
            raise ValueError(f"{name} must hold (height, width) pairs, got {s!r}")
        for v in s:
            if not isinstance(v, (int, torch.SymInt)) or isinstance(v, bool):
                raise TypeError(f"{name} must hold integer (height, width) pairs, got {s!r}")
            if isinstance(v, int) and v < 0:
                raise ValueError(f"{name} must be non-negative, got {s!r}")
        sizes.append(s)
    if not 1 <= len(sizes) <= _MAX_LEVELS:
        raise ValueError(f"{name} must describe between 1 and {_MAX_LEVELS} levels, got {len(sizes)}")
    return sizes


def _stride_list(strides, levels: int) -> list[tuple[float, float]]:
    strides = list(strides)
    if len(strides) != levels:
        raise ValueError(f"strides must give one stride per level ({levels}), got {len(strides)}")
    out = []
    for s in strides:
        pair = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
        if len(pair) != 2:
            raise ValueError(f"each stride must be a number or a (stride_y, stride_x) pair, got {s!r}")
        pair = tuple(float(v) for v in pair)
        if not all(0 <= v < math.inf for v in pair):  # also rejects NaN; no math.isfinite, so symbolic values trace
            raise ValueError(f"strides must be finite and non-negative, got {s!r}")
        out.append(pair)
    return out


def _flat(pairs) -> list:
    return [v for pair in pairs for v in pair]


def _check_offset(offset) -> float:
    offset = float(offset)
    if not -math.inf < offset < math.inf:
        raise ValueError(f"offset must be finite, got {offset}")
    return offset


class _Cache:
    """A small LRU map: multi-scale training sees a handful of input sizes, so a few entries cover the common case
    without holding on to every size ever seen."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, make):
        if self.capacity <= 0 or torch.compiler.is_compiling():
            return make()
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        value = make()
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _per_image(anchors: Tensor, image_list) -> list[Tensor]:
    count = len(image_list.image_sizes)
    return [anchors for _ in range(count)]


def _image_shape(image_list) -> tuple:
    if not hasattr(image_list, "tensors") or not hasattr(image_list, "image_sizes"):
        raise TypeError("image_list must be an ImageList-like object with .tensors and .image_sizes")
    return tuple(image_list.tensors.shape[-2:])


def _feature_grids(feature_maps) -> list[tuple]:
    if isinstance(feature_maps, Tensor) or len(feature_maps) == 0:
        raise ValueError("feature_maps must be a non-empty list of [B, C, H, W] tensors")
    return [tuple(f.shape[-2:]) for f in feature_maps]


# --------------------------------------------------------------------------------------------------------------------
# torchvision AnchorGenerator
# --------------------------------------------------------------------------------------------------------------------


def _cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred cell anchors of one level, [len(ratios) * len(sizes), 4], exactly as torchvision computes them:
    in float32, h_ratio = sqrt(ratio), w_ratio = 1 / h_ratio, (-w, -h, w, h) / 2 rounded half to even. They are
    rounded in float32 before any conversion to the feature dtype, so float16 and float64 anchors use the same
    integers."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _normalise_sizes_and_ratios(sizes, aspect_ratios):
    # torchvision's conventions: a flat tuple of sizes means one size per level; a flat tuple of ratios is shared.
    if len(sizes) == 0:
        raise ValueError("sizes must not be empty")
    if not isinstance(sizes[0], (list, tuple)):
        sizes = tuple((s,) for s in sizes)
    if len(aspect_ratios) == 0:
        raise ValueError("aspect_ratios must not be empty")
    if not isinstance(aspect_ratios[0], (list, tuple)):
        aspect_ratios = (aspect_ratios,) * len(sizes)
    if len(sizes) != len(aspect_ratios):
        raise ValueError(
            f"sizes and aspect_ratios must describe the same number of levels, got {len(sizes)} and "
            f"{len(aspect_ratios)}"
        )
    if len(sizes) > _MAX_LEVELS:
        raise ValueError(f"at most {_MAX_LEVELS} levels are supported, got {len(sizes)}")
    sizes = tuple(_positive_numbers(s, f"sizes[{i}]") for i, s in enumerate(sizes))
    aspect_ratios = tuple(_positive_numbers(r, f"aspect_ratios[{i}]") for i, r in enumerate(aspect_ratios))
    return sizes, aspect_ratios


def _grid_anchors(cell_anchors: Tensor, counts: list[int], grids, strides, offset: float) -> Tensor:
    return native("grid_anchors")(cell_anchors, counts, _flat(grids), _flat(strides), offset)


def generate_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence,
    sizes: Sequence,
    aspect_ratios: Sequence,
    *,
    offset: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Anchors of all pyramid levels in one kernel launch, with torchvision ``AnchorGenerator`` semantics.

    Args:
        feature_sizes (list of (H_l, W_l)): feature-grid size of each level.
        strides (list): stride of each level in pixels, a number or a ``(stride_y, stride_x)`` pair
            (torchvision uses ``image_size // feature_size`` per axis).
        sizes, aspect_ratios: as :class:`AnchorGenerator` (per level; ratio = height / width).
        offset (float): cell offset; 0 = torchvision (anchors around the cell's top-left corner), 0.5 = detectron2
            (around the cell centre).
        dtype, device: of the result.

    Returns:
        Tensor[sum_l H_l * W_l * A_l, 4]: ``(x1, y1, x2, y2)``; ``A_l = len(sizes[l]) * len(aspect_ratios[l])``.
    """
    sizes, aspect_ratios = _normalise_sizes_and_ratios(sizes, aspect_ratios)
    grids = _grid_list(feature_sizes)
    if len(grids) != len(sizes):
        raise ValueError(f"feature_sizes describes {len(grids)} levels but sizes {len(sizes)}")
    cells = [_cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
    table = torch.cat(cells).to(dtype=dtype, device=device)
    return _grid_anchors(table, [c.shape[0] for c in cells], grids, _stride_list(strides, len(grids)),
                         _check_offset(offset))


class AnchorGenerator(nn.Module):
    """Drop-in replacement for ``torchvision.models.detection.anchor_utils.AnchorGenerator``.

    Args:
        sizes (tuple of tuples of int): anchor sizes (sqrt of the area, pixels) per feature map.
        aspect_ratios (tuple of tuples of float): height / width ratios per feature map (a flat tuple is shared by
            all levels, as in torchvision).
        offset (float): 0 (default, torchvision) or 0.5 (detectron2); see the module docstring.
        cache_size (int): how many distinct (feature sizes, strides, dtype, device) results to keep; 0 disables it.

    ``forward(image_list, feature_maps)`` returns, like torchvision, a list with one ``Tensor[N, 4]`` per image, where
    ``N = sum_l H_l * W_l * A_l``; the strides are ``image_size // feature_size`` per axis. All images share one
    cached tensor (the list holds views of it; see the module docstring on in-place changes). Cell anchors are
    torchvision's, bit for bit (:attr:`cell_anchors` holds them in float32), and so are the anchors.
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),), offset: float = 0.0,
                 cache_size: int = 8):
        super().__init__()
        self.sizes, self.aspect_ratios = _normalise_sizes_and_ratios(sizes, aspect_ratios)
        self.offset = _check_offset(offset)
        self.cell_anchors = [_cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._counts = [c.shape[0] for c in self.cell_anchors]
        self._table = torch.cat(self.cell_anchors)
        self._tables = _Cache(8)  # the table converted per (dtype, device)
        self._cache = _Cache(cache_size)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def anchors(self, grid_sizes, strides, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Tensor:
        """All levels' anchors, ``Tensor[N, 4]``, for explicit grid sizes ``[(H, W), ...]`` and strides (numbers or
        ``(stride_y, stride_x)`` pairs); cached."""
        grids = _grid_list(grid_sizes, "grid_sizes")
        if len(grids) != len(self._counts):
            raise ValueError(
                f"got {len(grids)} feature maps but the generator has {len(self._counts)} levels of sizes and "
                "aspect ratios; they must match"
            )
        strides = _stride_list(strides, len(grids))
        device = torch.device(device)
        key = (tuple(grids), tuple(strides), dtype, device)

        def make():
            table = self._tables.get((dtype, device), lambda: self._table.to(dtype=dtype, device=device))
            return _grid_anchors(table, self._counts, grids, strides, self.offset)

        return self._cache.get(key, make)

    def grid_anchors(self, grid_sizes, strides) -> list[Tensor]:
        """torchvision's per-level list (float32, on the device of :attr:`cell_anchors`)."""
        anchors = self.anchors(grid_sizes, strides, self.cell_anchors[0].dtype, self.cell_anchors[0].device)
        counts = [int(h) * int(w) * a for (h, w), a in zip(_grid_list(grid_sizes, "grid_sizes"), self._counts)]
        return list(anchors.split(counts))

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        grids = _feature_grids(feature_maps)
        image_h, image_w = _image_shape(image_list)
        # torchvision's strides; int() specialises them under torch.compile (the op takes plain numbers)
        strides = [(int(image_h // h), int(image_w // w)) for h, w in grids]
        anchors = self.anchors(grids, strides, feature_maps[0].dtype, feature_maps[0].device)
        return _per_image(anchors, image_list)


# --------------------------------------------------------------------------------------------------------------------
# SSD DefaultBoxGenerator
# --------------------------------------------------------------------------------------------------------------------


def _ssd_scales(num_outputs: int, min_ratio: float, max_ratio: float, scales):
    if scales is not None:
        scales = list(_positive_numbers(scales, "scales"))
        if len(scales) < num_outputs + 1:
            raise ValueError(f"scales must hold one scale per level plus one ({num_outputs + 1}), got {len(scales)}")
        return scales
    if not (0 < min_ratio and 0 < max_ratio and min_ratio < math.inf and max_ratio < math.inf):
        raise ValueError(f"min_ratio and max_ratio must be finite and positive, got {min_ratio}, {max_ratio}")
    # torchvision's linear spacing (SSD paper eq. 4), plus 1.0 for the extra box of the last level.
    if num_outputs > 1:
        range_ratio = max_ratio - min_ratio
        return [min_ratio + range_ratio * k / (num_outputs - 1.0) for k in range(num_outputs)] + [1.0]
    return [min_ratio, max_ratio]


def _ssd_wh_pairs(scales, aspect_ratios, clip: bool) -> list[Tensor]:
    """Per level: (s_k, s_k), (s'_k, s'_k) with s'_k = sqrt(s_k s_{k+1}), then (s_k sqrt(a), s_k / sqrt(a)) and its
    transpose for every ratio a; formed in Python floats and stored as float32, as torchvision does, then clamped to
    [0, 1] if ``clip``."""
    pairs = []
    for k, ratios in enumerate(aspect_ratios):
        s_k = scales[k]
        s_prime = math.sqrt(scales[k] * scales[k + 1])
        wh = [[s_k, s_k], [s_prime, s_prime]]
        for ar in ratios:
            sq = math.sqrt(ar)
            w, h = s_k * sq, s_k / sq
            wh.extend([[w, h], [h, w]])
        t = torch.as_tensor(wh, dtype=torch.float32)
        pairs.append(t.clamp(min=0, max=1) if clip else t)
    return pairs


def ssd_default_boxes(
    feature_sizes: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    aspect_ratios: Sequence[Sequence[float]],
    *,
    min_ratio: float = 0.15,
    max_ratio: float = 0.9,
    scales: Sequence[float] | None = None,
    steps: Sequence[float] | None = None,
    clip: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """SSD default boxes of all levels in one kernel launch (``DefaultBoxGenerator`` semantics, one image).

    Args:
        feature_sizes (list of (H_k, W_k)): feature-grid sizes.
        image_size ((height, width)): input image size in pixels.
        aspect_ratios, min_ratio, max_ratio, scales, steps, clip: as :class:`DefaultBoxGenerator`.
        dtype: dtype of the feature maps (the centres are rounded to it, as torchvision does).

    Returns:
        Tensor[sum_k H_k * W_k * (2 + 2 * len(aspect_ratios[k])), 4]: ``(x1, y1, x2, y2)`` in pixels; float64 for
        float64 ``dtype``, float32 otherwise (torchvision promotes the float16/bfloat16 centres with its float32 box
        sizes, so its SSD boxes are float32 there too).
    """
    gen = DefaultBoxGenerator(aspect_ratios, min_ratio, max_ratio, scales, steps, clip, cache_size=0)
    return gen.default_boxes(feature_sizes, image_size, dtype, device)


class DefaultBoxGenerator(nn.Module):
    """Drop-in replacement for ``torchvision.models.detection.anchor_utils.DefaultBoxGenerator`` (SSD).

    Args:
        aspect_ratios (list of lists): extra aspect ratios per level; each adds two boxes (a and 1/a).
        min_ratio, max_ratio (float): scale range (fractions of the image) when ``scales`` is None.
        scales (list of float, optional): per-level scales, one more than the number of levels.
        steps (list of int, optional): per-level step in pixels; the grid divisor is then image_size / step instead
            of the feature size.
        clip (bool): clamp the normalised (w, h) of the default boxes to [0, 1] before tiling (torchvision's clip).
        cache_size (int): results kept per (feature sizes, image size, dtype, device); 0 disables the cache.

    ``forward(image_list, feature_maps)`` returns one ``Tensor[N, 4]`` (xyxy, pixels) per image, views of one cached
    tensor, with torchvision's values and dtype (see :func:`ssd_default_boxes`).
    """

    def __init__(self, aspect_ratios, min_ratio: float = 0.15, max_ratio: float = 0.9, scales=None, steps=None,
                 clip: bool = True, cache_size: int = 8):
        super().__init__()
        aspect_ratios = [list(r) for r in aspect_ratios]
        if len(aspect_ratios) == 0 or len(aspect_ratios) > _MAX_LEVELS:
            raise ValueError(
                f"aspect_ratios must describe between 1 and {_MAX_LEVELS} levels, got {len(aspect_ratios)}"
            )
        for i, r in enumerate(aspect_ratios):
            if len(r) > 0:
                _positive_numbers(r, f"aspect_ratios[{i}]")
        if steps is not None:
            if len(steps) != len(aspect_ratios):
                raise ValueError("aspect_ratios and steps should have the same length")
            _positive_numbers(steps, "steps")
        self.aspect_ratios = aspect_ratios
        self.steps = steps
        self.clip = clip
        self.scales = _ssd_scales(len(aspect_ratios), min_ratio, max_ratio, scales)
        self._wh_pairs = _ssd_wh_pairs(self.scales, aspect_ratios, clip)
        self._counts = [p.shape[0] for p in self._wh_pairs]
        self._table = torch.cat(self._wh_pairs)
        self._cache = _Cache(cache_size)

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def default_boxes(self, grid_sizes, image_size, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Tensor:
        """All levels' default boxes, ``Tensor[N, 4]``, for explicit grid sizes and image size ``(H, W)``; cached."""
        grids = _grid_list(grid_sizes, "grid_sizes")
        if len(grids) != len(self._counts):
            raise ValueError(f"got {len(grids)} feature maps but the generator has {len(self._counts)} levels")
        image_size = tuple(image_size)
        if len(image_size) != 2 or any(not isinstance(v, (int, torch.SymInt)) or v < 0 for v in image_size):
            raise ValueError(f"image_size must be (height, width) non-negative integers, got {image_size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if self.steps is not None:
            divisors = [(image_size[0] / s, image_size[1] / s) for s in self.steps]
        else:
            divisors = [(float(h), float(w)) for h, w in grids]
        for (h, w), (dy, dx) in zip(grids, divisors):
            if (h * w > 0) and not (dy > 0 and dx > 0):
                raise ValueError(f"a level of grid size {(h, w)} needs a positive image size, got {image_size!r}")
        divisors = [(dy if dy > 0 else 1.0, dx if dx > 0 else 1.0) for dy, dx in divisors]
        device = torch.device(device)
        key = (tuple(grids), image_size, dtype, device)

        def make():
            return native("ssd_default_boxes")(self._table.to(device), self._counts, _flat(grids), _flat(divisors),
                                               list(image_size), dtype)

        return self._cache.get(key, make)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        grids = _feature_grids(feature_maps)
        boxes = self.default_boxes(grids, _image_shape(image_list), feature_maps[0].dtype, feature_maps[0].device)
        return _per_image(boxes, image_list)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(aspect_ratios={self.aspect_ratios}, clip={self.clip}, "
                f"scales={self.scales}, steps={self.steps})")


# --------------------------------------------------------------------------------------------------------------------
# YOLO grid priors
# --------------------------------------------------------------------------------------------------------------------


def yolo_grid_priors(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence,
    anchor_sizes: Sequence[Sequence[tuple[float, float]]] | None = None,
    *,
    offset: float = 0.5,
    fmt: str = "cxcywh",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """YOLO-style priors of all levels in one kernel launch.

    Args:
        feature_sizes (list of (H_l, W_l)): feature-grid sizes.
        strides (list): stride of each level in pixels (a number or a ``(stride_y, stride_x)`` pair).
        anchor_sizes (list of lists of (w, h), optional): per-level prior sizes in pixels (YOLOv3/v5 anchors, e.g.
            ``[[(10, 13), (16, 30), (33, 23)], ...]``). None gives anchor-free point priors (YOLOX, YOLOv8): one per
            cell with ``(w, h) = (stride_x, stride_y)``.
        offset (float): position of the prior centre within its cell, in cells; 0.5 = cell centre.
        fmt (str): ``'cxcywh'`` (default) or ``'xyxy'``.
        dtype, device: of the result.

    Returns:
        Tensor[sum_l H_l * W_l * P_l, 4], with centre ``((x + offset) * stride_x, (y + offset) * stride_y)``,
        formed in float64 and rounded once to ``dtype`` (through float32 for float16/bfloat16).
    """
    grids = _grid_list(feature_sizes)
    strides = _stride_list(strides, len(grids))
    if fmt not in ("cxcywh", "xyxy"):
        raise ValueError(f"fmt must be 'cxcywh' or 'xyxy', got {fmt!r}")
    if anchor_sizes is None:
        tables = [[(sx, sy)] for sy, sx in strides]
    else:
        tables = [list(level) for level in anchor_sizes]
        if len(tables) != len(grids):
            raise ValueError(f"anchor_sizes describes {len(tables)} levels but feature_sizes {len(grids)}")
        for i, level in enumerate(tables):
            for wh in level:
                _positive_numbers(wh, f"anchor_sizes[{i}]")
                if len(tuple(wh)) != 2:
                    raise ValueError(f"anchor_sizes[{i}] must hold (w, h) pairs, got {wh!r}")
    counts = [len(t) for t in tables]
    flat = [tuple(map(float, wh)) for t in tables for wh in t]
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    wh = torch.tensor(flat, dtype=torch.float64).reshape(-1, 2).to(device=device)
    return native("grid_priors")(wh, counts, _flat(grids), _flat(strides), _check_offset(offset), fmt == "xyxy",
                                 dtype)


# --------------------------------------------------------------------------------------------------------------------
# fake kernels: the output length is sum over levels of H * W * cells, symbolic under dynamic shapes
# --------------------------------------------------------------------------------------------------------------------


def _rows(counts, grid_sizes):
    return sum(grid_sizes[2 * i] * grid_sizes[2 * i + 1] * a for i, a in enumerate(counts))


@register_fake("grid_anchors")
def _grid_anchors_fake(cell_anchors, anchors_per_level, grid_sizes, strides, offset):
    return cell_anchors.new_empty((_rows(anchors_per_level, grid_sizes), 4))


@register_fake("ssd_default_boxes")
def _ssd_default_boxes_fake(wh_pairs, boxes_per_level, grid_sizes, divisors, image_size, dtype):
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return wh_pairs.new_empty((_rows(boxes_per_level, grid_sizes), 4), dtype=out_dtype)


@register_fake("grid_priors")
def _grid_priors_fake(wh, priors_per_level, grid_sizes, strides, offset, xyxy, dtype):
    return wh.new_empty((_rows(priors_per_level, grid_sizes), 4), dtype=dtype)
