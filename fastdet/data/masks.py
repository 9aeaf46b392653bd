"""Instance masks in datasets: COCO segmentations (polygons, uncompressed and compressed RLE, crowd RLE) to binary
masks and back, through pycocotools' mask API.

A record's ``segmentations`` holds one COCO ``segmentation`` value per object, as found in (or written to) the JSON:

* polygons: ``[[x1, y1, x2, y2, ...], ...]`` in pixel-edge coordinates (one list per part of the object);
* RLE: ``{"size": [H, W], "counts": [...]}`` (uncompressed, COCO's crowd annotations) or ``{"size": [H, W],
  "counts": "..."}`` (compressed string);
* ``None``: the object has no segmentation; its mask is its box, filled.

Datasets decode them lazily, per sample, into ``target["masks"]``: ``Tensor[N, H, W]`` uint8 (0/1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["check_segmentation", "decode_segmentation", "decode_segmentations", "encode_mask", "polygons_area"]


def _mask_api():
    from pycocotools import mask as mask_api  # a runtime dependency; imported where needed

    return mask_api


def check_segmentation(segmentation: Any) -> str | None:
    """Why ``segmentation`` is not a COCO segmentation (None when it is one)."""
    if segmentation is None:
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 0
                                                                            for v in size)):
            return f"RLE 'size' must be [height, width], got {size!r}"
        if not isinstance(counts, (str, bytes, list)):
            return f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}"
        if isinstance(counts, list) and sum(int(c) for c in counts) != size[0] * size[1]:
            return f"RLE counts add up to {sum(int(c) for c in counts)}, not height * width = {size[0] * size[1]}"
        return None
    if isinstance(segmentation, list):
        for part in segmentation:
            if not isinstance(part, (list, tuple)) or len(part) < 6 or len(part) % 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in part):
                return "polygons must be lists of at least 3 finite (x, y) pairs"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"


def decode_segmentation(segmentation: Any, height: int, width: int, box: Sequence[float] | None = None) -> np.ndarray:
    """One object's binary mask ``uint8 [height, width]`` (``box``, filled, when ``segmentation`` is None)."""
    if segmentation is None:
        mask = np.zeros((height, width), np.uint8)
        if box is not None:
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 1
        return mask
    api = _mask_api()
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), np.uint8)
        rle = api.merge(api.frPyObjects([list(map(float, p)) for p in segmentation], height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = api.frPyObjects(segmentation, *segmentation["size"])
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    mask = api.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"RLE of size {list(mask.shape)} does not match the image ({height} x {width})")
    return np.ascontiguousarray(mask, dtype=np.uint8)


def decode_segmentations(segmentations: Sequence[Any], height: int, width: int, boxes: np.ndarray) -> np.ndarray:
    """``uint8 [N, height, width]`` masks of ``N`` objects."""
    out = np.zeros((len(segmentations), height, width), np.uint8)
    for i, seg in enumerate(segmentations):
        out[i] = decode_segmentation(seg, height, width, boxes[i] if len(boxes) > i else None)
    return out


def encode_mask(mask: np.ndarray) -> dict:
    """A binary ``[H, W]`` mask as compressed COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = _mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygons_area(polygons: Sequence[Sequence[float]], height: int, width: int) -> float:
    """Pixel area of polygons rasterised as COCO does."""
    if not polygons:
        return 0.0
    api = _mask_api()
    return float(api.area(api.merge(api.frPyObjects([list(map(float, p)) for p in polygons], height, width))))
