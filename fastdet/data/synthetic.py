"""A synthetic "shapes" detection dataset written as real COCO JSON + PNG files: the project demo's data.

Each image has a random background (solid colour, linear gradient, smooth colour blobs, stripes or pixel noise) and a few
filled shapes of random kind, colour, size and aspect. Placement rules keep every object identifiable:

* a new shape is rejected if its box overlaps any earlier box with IoU above ``max_iou``;
* a new shape is rejected if it would hide so much of an earlier shape that less than ``min_visible`` of that shape's
  pixels stay visible;
* a shape's colour differs clearly (RGB distance of at least 80) from the background under it and from the
  colours of the shapes whose boxes touch it.

Boxes are tight around the visible pixels of each shape (pixel ``c`` covers ``[c, c + 1)``, so a shape spanning columns
``c0..c1`` gets ``x = c0, w = c1 - c0 + 1``). Everything is drawn from ``numpy.random.default_rng([seed, index])``, so
image ``index`` is the same whatever ``num_images`` is, and the whole dataset is reproducible from ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from fastdet.data._base import ImageRecord
from fastdet.data.coco import to_coco_dict, write_coco_json
from fastdet.data.masks import encode_mask
from fastdet.data.split import DEFAULT_SPLIT_NAMES, check_ratios, split_indices

SHAPE_KINDS = ("rectangle", "ellipse", "triangle", "star", "cross", "hexagon")
BACKGROUND_KINDS = ("solid", "gradient", "blobs", "stripes", "noise")
_MIN_COLOUR_DISTANCE = 80.0
_PLACEMENT_ATTEMPTS = 30


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    base = rng.integers(0, 256, 3).astype(np.float32)
    if kind == "solid":
        image = np.broadcast_to(base, (height, width, 3))
    elif kind == "gradient":
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = base + (other - base) * t[..., None]
    elif kind == "stripes":
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(8, 40)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period
        image = np.where(((phase % 1.0) < 0.5)[..., None], base, other)
    elif kind == "blobs":
        cells = int(rng.integers(2, 7))
        grid = rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.uint8)
    else:  # pixel noise around a base colour
        noise = rng.standard_normal((height, width, 3), dtype=np.float32)
        image = base + noise * np.float32(rng.uniform(8, 40))
    return np.clip(image, 0, 255).astype(np.uint8)


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices of a shape in arbitrary units; the caller stretches them onto the object's box."""
    if kind == "triangle":
        apex = rng.uniform(0.0, 1.0)
        points = np.array([[apex, 0.0], [0.0, 1.0], [1.0, 1.0]])
        if rng.random() < 0.5:  # apex down
            points[:, 1] = 1.0 - points[:, 1]
        return points
    if kind == "star":
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if kind == "hexagon":
        angles = rng.uniform(0, np.pi / 3) + np.arange(6) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    raise ValueError(kind)


def _shape_mask(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A bool mask ``[height, width]`` of the shape filling its box (touching all four sides)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "rectangle":
        return np.ones((height, width), bool)
    if kind == "ellipse":
        draw.ellipse([0, 0, width - 1, height - 1], fill=255)
    elif kind == "cross":
        tx = max(int(round(width * rng.uniform(0.28, 0.45))), 1)
        ty = max(int(round(height * rng.uniform(0.28, 0.45))), 1)
        x0, y0 = (width - tx) // 2, (height - ty) // 2
        draw.rectangle([x0, 0, x0 + tx - 1, height - 1], fill=255)
        draw.rectangle([0, y0, width - 1, y0 + ty - 1], fill=255)
    else:
        points = _unit_polygon(kind, rng)
        lo, hi = points.min(axis=0), points.max(axis=0)
        points = (points - lo) / (hi - lo) * np.array([width - 1, height - 1])
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas) > 0


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + areas - inter)


def render_shapes_image(index: int, seed: int = 0, image_size: tuple[int, int] = (256, 256),
                        shapes: Sequence[str] = SHAPE_KINDS[:3], min_objects: int = 1, max_objects: int = 6,
                        min_size: float = 0.1, max_size: float = 0.45, max_iou: float = 0.3,
                        min_visible: float = 0.7, return_masks: bool = False):
    """Render image ``index`` of the dataset with this ``seed``: ``(image uint8 [H, W, 3], boxes float32 [N, 4] xyxy,
    labels int64 [N] in 1..len(shapes))``, plus with ``return_masks`` the instance masks ``bool [N, H, W]`` (each
    object's visible pixels: a later object that covers part of an earlier one takes those pixels). Fewer than the
    drawn number of objects appear when no admissible place is found within a fixed number of attempts."""
    height, width = image_size
    rng = np.random.default_rng([int(seed), int(index)])
    background = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int16)  # which object is on top at each pixel
    full_pixels: list[int] = []
    visible = np.zeros(0, np.int64)
    boxes = np.zeros((0, 4), np.float64)
    labels: list[int] = []
    colours: list[np.ndarray] = []
    short_side = min(height, width)
    target = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(target):
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            kind_index = int(rng.integers(len(shapes)))
            side = rng.uniform(min_size, max_size) * short_side
            aspect = np.exp(rng.uniform(-0.5, 0.5))  # width / height between ~0.6 and ~1.65
            w = int(np.clip(round(side * np.sqrt(aspect)), 4, width))
            h = int(np.clip(round(side / np.sqrt(aspect)), 4, height))
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            box = np.array([x, y, x + w, y + h], np.float64)
            if (_box_iou(box, boxes) > max_iou).any():
                continue
            mask = _shape_mask(shapes[kind_index], w, h, rng)
            covered = owner[y:y + h, x:x + w][mask]
            hidden = np.bincount(covered[covered >= 0], minlength=len(full_pixels))
            if len(full_pixels) and ((visible - hidden) < min_visible * np.asarray(full_pixels)).any():
                continue
            # The colour must stand out from the background under the shape and from every object whose box
            # touches this one, or neighbouring shapes of similar colour would merge into one blob.
            under = background[y:y + h, x:x + w][mask].mean(axis=0, dtype=np.float32)
            touching = ((boxes[:, 0] <= box[2]) & (boxes[:, 2] >= box[0]) & (boxes[:, 1] <= box[3])
                        & (boxes[:, 3] >= box[1])) if len(boxes) else np.zeros(0, bool)
            avoid = np.concatenate([under[None], np.asarray(colours, np.float32).reshape(-1, 3)[touching]])
            colour = rng.integers(0, 256, 3).astype(np.float32)
            for _c in range(16):
                if np.linalg.norm(colour - avoid, axis=1).min() >= _MIN_COLOUR_DISTANCE:
                    break
                colour = rng.integers(0, 256, 3).astype(np.float32)
            else:
                continue  # no distinct colour found: try another placement
            k = len(full_pixels)
            owner[y:y + h, x:x + w][mask] = k
            visible = np.append(visible - hidden, int(mask.sum()))
            full_pixels.append(int(mask.sum()))
            boxes = np.concatenate([boxes, box[None]])
            labels.append(kind_index + 1)
            colours.append(colour)
            break
    palette = np.asarray(colours, np.uint8).reshape(-1, 3)
    image = background.copy()
    on_object = owner >= 0
    image[on_object] = palette[owner[on_object]]
    if rng.random() < 0.15:  # sensor-like noise over everything; boxes are unaffected
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    # Tight boxes around the visible pixels of each object, searched only inside the object's own placement box.
    tight = np.zeros((len(labels), 4), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64).tolist()):
        mine = owner[y1:y2, x1:x2] == k
        cols = np.flatnonzero(mine.any(axis=0))
        rows = np.flatnonzero(mine.any(axis=1))
        tight[k] = (x1 + cols[0], y1 + rows[0], x1 + cols[-1] + 1, y1 + rows[-1] + 1)
    if return_masks:
        masks = owner[None] == np.arange(len(labels), dtype=np.int16)[:, None, None]
        return image, tight, np.asarray(labels, np.int64), masks
    return image, tight, np.asarray(labels, np.int64)


def make_shapes_dataset(root: str | Path, num_images: int = 200, image_size: tuple[int, int] = (256, 256),
                        shapes: int | Sequence[str] = 3, min_objects: int = 1, max_objects: int = 6,
                        min_size: float = 0.1, max_size: float = 0.45, seed: int = 0,
                        split: Sequence[float] = (0.8, 0.1, 0.1), max_iou: float = 0.3,
                        min_visible: float = 0.7, masks: bool = False) -> dict[str, Path]:
    """Generate the shapes dataset under ``root`` and return its paths.

    Writes ``root/images/{image_id:06d}.png`` (image ids ``1..num_images``; image ``index`` has id ``index + 1``) and ``root/annotations/instances_{train,val,test}.json`` (COCO: images
    with width/height, annotations with ``bbox = [x, y, w, h]``, ``area`` (box area), ``iscrowd = 0`` and unique ids;
    categories ``1..K`` named after the shapes). A split with no images (e.g. ``split=(1, 0, 0)``) writes no file.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        num_images: number of images (>= 1).
        image_size: ``(height, width)`` in pixels (each >= 32).
        shapes: how many shape kinds to use (the first ``shapes`` of :data:`SHAPE_KINDS`: rectangle, ellipse,
            triangle, star, cross, hexagon) or the kinds by name; category ``k`` is ``shapes[k - 1]``.
        min_objects, max_objects: objects attempted per image (``1 <= min <= max``; a crowded image may get fewer).
        min_size, max_size: object size as a fraction of the image's shorter side (``0 < min <= max <= 1``).
        seed: everything is a deterministic function of the seed (and each image's index).
        split: train/val/test ratios; membership is :func:`fastdet.data.split.split_indices` with this seed.
        max_iou: largest allowed IoU between two objects' boxes.
        min_visible: smallest fraction of an object's pixels that later objects may leave visible.
        masks: also write each object's instance mask (its visible pixels) as the annotation's ``segmentation``
            (compressed RLE), for instance segmentation (Mask R-CNN). Boxes, areas and images are unchanged.

    Returns:
        ``{"root", "images", "train", "val", "test"}`` paths (only the splits that were written).
    """
    if isinstance(shapes, (int, np.integer)) and not isinstance(shapes, bool):
        if not 1 <= shapes <= len(SHAPE_KINDS):
            raise ValueError(f"shapes must be between 1 and {len(SHAPE_KINDS)} or a list of {SHAPE_KINDS}, "
                             f"got {shapes}")
        kinds = SHAPE_KINDS[:int(shapes)]
    else:
        kinds = tuple(shapes)
        unknown = [k for k in kinds if k not in SHAPE_KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            raise ValueError(f"shapes must be distinct names from {SHAPE_KINDS}, got {shapes!r}")
    if not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 32:
        raise ValueError(f"image_size must be (height, width) with both >= 32, got {image_size!r}")
    if not (1 <= min_objects <= max_objects):
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not (0 < min_size <= max_size <= 1):
        raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
    if not (0 <= max_iou <= 1) or not (0 <= min_visible <= 1):
        raise ValueError(f"max_iou and min_visible must lie in [0, 1], got {max_iou}, {min_visible}")
    check_ratios(split)
    height, width = int(image_size[0]), int(image_size[1])

    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(int(num_images)):
        rendered = render_shapes_image(index, seed, (height, width), kinds, min_objects, max_objects, min_size,
                                       max_size, max_iou, min_visible, return_masks=masks)
        image, boxes, labels = rendered[:3]
        segmentations = [encode_mask(m) for m in rendered[3]] if masks else None
        # Files are named after their image id, so formats without ids (YOLO, VOC, KITTI) recover it from the name.
        file_name = f"{index + 1:06d}.png"
        Image.fromarray(image).save(image_dir / file_name, compress_level=1)
        records.append(ImageRecord(file_name=file_name, image_id=index + 1, width=width, height=height,
                                   boxes=boxes, labels=labels, segmentations=segmentations))
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in enumerate(kinds, start=1)]
    paths: dict[str, Path] = {"root": root, "images": image_dir}
    for name, indices in zip(DEFAULT_SPLIT_NAMES, split_indices(len(records), split, seed)):
        if len(indices) == 0:
            continue
        coco = to_coco_dict([records[i] for i in indices.tolist()], categories)
        coco["info"] = {"description": f"fastdet synthetic shapes, seed {seed}, split {name}"}
        paths[name] = write_coco_json(root / "annotations" / f"instances_{name}.json", coco)
    return paths
