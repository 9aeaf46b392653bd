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

__all__ = ["check_segmentation", "decode_segmentation", "decode_segmentations", "encode_mask", "join_polygons",
           "mask_to_polygon", "polygons_area"]


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


def join_polygons(parts: Sequence[Sequence[float]]) -> list[float]:
    """One closed outline ``[x1, y1, x2, y2, ...]`` through every part of a multi-part polygon, for formats that hold a
    single polygon per object (YOLO segmentation txt). Each part is entered from the nearest vertex of the outline
    built so far and left the same way, so the connecting segments are walked there and back and enclose no area:
    under pycocotools' rasterisation the outline covers the parts' pixels (where parts overlap, the overlap is
    covered an even number of times and may come out empty; COCO's own multi-part polygons do not overlap)."""
    loops = [np.asarray(p, np.float64).reshape(-1, 2) for p in parts if len(p) >= 6]
    if not loops:
        return []
    joined = loops[-1]
    for loop in reversed(loops[:-1]):
        # nearest pair (a on this part, b on the outline so far); the outline is a closed walk, so rotating it to
        # start at b leaves it the same walk
        distance = ((loop[:, None, :] - joined[None, :, :]) ** 2).sum(-1)
        a, b = np.unravel_index(int(np.argmin(distance)), distance.shape)
        rotated = np.concatenate([joined[b:], joined[:b]])
        joined = np.concatenate([loop[:a + 1], rotated, rotated[:1], loop[a:]])
    return [float(v) for v in joined.reshape(-1)]


def _boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """The pixel-edge boundary of a binary mask as closed loops of corner points ``(x, y)``, interior on the right of
    the walking direction (outer boundaries clockwise on screen, holes anticlockwise), collinear points dropped."""
    m = np.pad(np.asarray(mask, bool), 1)
    inside = m[1:-1, 1:-1]
    rows, cols = np.nonzero(inside & ~m[:-2, 1:-1])  # outside above: top edge, walking +x
    starts = [np.stack([cols, rows], 1)]
    steps = [(1, 0)]
    rows, cols = np.nonzero(inside & ~m[1:-1, 2:])  # outside right: right edge, walking +y
    starts.append(np.stack([cols + 1, rows], 1))
    steps.append((0, 1))
    rows, cols = np.nonzero(inside & ~m[2:, 1:-1])  # outside below: bottom edge, walking -x
    starts.append(np.stack([cols + 1, rows + 1], 1))
    steps.append((-1, 0))
    rows, cols = np.nonzero(inside & ~m[1:-1, :-2])  # outside left: left edge, walking -y
    starts.append(np.stack([cols, rows + 1], 1))
    steps.append((0, -1))
    width = mask.shape[1] + 2
    outgoing: dict[int, list[int]] = {}
    edge_start = np.concatenate(starts)
    edge_step = np.concatenate([np.tile(np.asarray(st), (len(sv), 1)) for st, sv in zip(steps, starts)])
    keys = (edge_start[:, 1] * width + edge_start[:, 0]).tolist()
    for e, key in enumerate(keys):
        outgoing.setdefault(key, []).append(e)
    used = np.zeros(len(keys), bool)
    loops = []
    for first in range(len(keys)):
        if used[first]:
            continue
        points, e = [], first
        while not used[e]:
            used[e] = True
            points.append(edge_start[e])
            x, y = edge_start[e] + edge_step[e]
            candidates = [c for c in outgoing[int(y * width + x)] if not used[c]]
            if not candidates:
                break
            # at a pinch (two pixels touching at a corner) turn towards the interior, which keeps loops simple
            e = candidates[0] if len(candidates) == 1 else max(
                candidates, key=lambda c: edge_step[e][0] * edge_step[c][1] - edge_step[e][1] * edge_step[c][0])
        loop = np.asarray(points, np.float64)
        turn = np.roll(loop, -1, 0) - loop
        previous = loop - np.roll(loop, 1, 0)
        corner = (turn[:, 0] * previous[:, 1] - turn[:, 1] * previous[:, 0]) != 0
        loops.append(loop[corner])
    return loops


def mask_to_polygon(mask: np.ndarray) -> list[float]:
    """A binary ``[H, W]`` mask as one polygon ``[x1, y1, ...]`` in pixel-edge coordinates (COCO's), tracing the
    pixel boundary of every connected part and hole and joining them with :func:`join_polygons`; pycocotools
    rasterises it back to the same mask. Empty for an empty mask."""
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return []
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    offset = np.array([cols[0], rows[0]], np.float64)
    return join_polygons([(loop + offset).reshape(-1).tolist() for loop in _boundary_loops(crop)])
