"""COCO JSON: reading (:class:`CocoDetection`, :func:`read_coco`), writing (:func:`write_coco_json`) and the
COCO-format ground truth of any dataset (:func:`to_coco_dict`) that the evaluator consumes.

Category ids in a COCO file may be any distinct integers (COCO itself uses 1..90 with gaps). The model sees contiguous
labels ``1..K`` in increasing category-id order; ``dataset.label_to_category_id`` maps back.

Besides the standard fields, fastdet reads and writes a few optional ones that pycocotools ignores, so that converting
through COCO loses nothing the other formats hold: per-annotation ``difficult``, ``truncated``, ``occluded``,
``alpha``, ``dimensions``, ``location``, ``rotation_y`` and per-image ``ignore_regions`` (``[[x, y, w, h], ...]``,
KITTI's ``DontCare`` areas).

Instance segmentations (``segmentation``: polygons, RLE, crowd RLE) are read into ``ImageRecord.segmentations`` and
decoded per sample into ``target["masks"]`` (:mod:`fastdet.data.masks`); :func:`to_coco_dict` writes them back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastdet.data._base import (
    OBJECT_ATTRIBUTES,
    DatasetContents,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    ProblemCollector,
    SkipReport,
    check_boxes,
    read_image_size,
)
from fastdet.data.masks import check_segmentation

_EXTRA_ATTRIBUTES = tuple(name for name in OBJECT_ATTRIBUTES if name not in ("area", "iscrowd"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError("missing_label", "annotation file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError("malformed_label", f"invalid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DatasetError("malformed_label", f"not UTF-8 text: {exc}", path) from None


def _parse_categories(data: dict, path: Path) -> tuple[list[int], list[str]]:
    categories = data.get("categories")
    if not isinstance(categories, list):
        raise DatasetError("malformed_label", "'categories' must be a list of {'id': int, 'name': str}", path)
    ids, names = [], []
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or not isinstance(category.get("name"), str):
            raise DatasetError("malformed_label", f"categories[{i}] must be {{'id': int, 'name': str}}, got "
                               f"{category!r}", path)
        ids.append(category["id"])
        names.append(category["name"])
    for kind, values in (("id", ids), ("name", names)):
        seen = set()
        for value in values:
            if value in seen:
                raise DatasetError("inconsistent_ids", f"category {kind} {value!r} appears more than once", path)
            seen.add(value)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return [ids[i] for i in order], [names[i] for i in order]


def read_coco(annotation_file: str | Path, image_root: str | Path, skip_bad: bool = False,
              verify_images: bool | None = None) -> tuple[list[ImageRecord], list[str], list[int], SkipReport]:
    """Parse a COCO instances file into ``(records, class_names, category_ids, skip_report)``.

    Every annotation is checked: its ``id`` must be unique, its ``image_id`` and ``category_id`` must exist, its
    ``bbox`` must be four finite numbers inside the image (see :func:`fastdet.data._base.check_boxes`) with positive
    width and height. Image ids must be unique, files must exist; with ``verify_images`` (default: ``skip_bad``) each
    image header is opened as well, catching unreadable files and sizes that disagree with the JSON. The first problem
    raises :class:`DatasetError`; with ``skip_bad=True`` the image concerned is left out with all its annotations and
    the problem is recorded in the returned :class:`SkipReport` (an annotation naming a missing image is recorded the
    same way).
    """
    path = Path(annotation_file)
    image_root = Path(image_root)
    if verify_images is None:
        verify_images = skip_bad
    collect = ProblemCollector(skip_bad)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DatasetError("malformed_label", f"expected a JSON object at the top level, got {type(data).__name__}", path)
    category_ids, class_names = _parse_categories(data, path)
    label_of = {cid: label for label, cid in enumerate(category_ids, start=1)}

    images = data.get("images")
    if not isinstance(images, list):
        raise DatasetError("malformed_label", "'images' must be a list", path)
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError("malformed_label", "'annotations' must be a list", path)

    # Images: id, file, size.
    image_info: dict[int, dict] = {}
    bad_images: set[int] = set()
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise DatasetError("malformed_label", f"images[{i}] must have an int 'id' and a str 'file_name', got "
                               f"{image!r}", path)
        image_id = image["id"]
        if image_id in image_info:
            raise DatasetError("inconsistent_ids", f"image id {image_id} appears more than once (images[{i}], "
                               f"file {image['file_name']!r})", path)
        image_info[image_id] = image
        width, height = image.get("width"), image.get("height")
        file_path = image_root / image["file_name"]
        try:
            if width is not None or height is not None:
                if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
                    raise DatasetError("malformed_label", f"images[{i}] ({image['file_name']!r}): width and height "
                                       f"must be positive ints, got {width!r} x {height!r}", path)
            if verify_images or width is None:
                actual = read_image_size(file_path)
                if width is not None and actual != (width, height):
                    raise DatasetError("size_mismatch", f"image is {actual[0]}x{actual[1]} but {path.name} says "
                                       f"{width}x{height} (width x height)", file_path)
                image["_size"] = actual
            elif not file_path.is_file():
                raise DatasetError("missing_image", "image file not found", file_path)
        except DatasetError as error:
            collect(error)
            bad_images.add(image_id)

    # Annotations: gathered into arrays, checked together.
    n = len(annotations)
    ann_ids = np.zeros(n, np.int64)
    ann_image = np.zeros(n, np.int64)
    ann_label = np.zeros(n, np.int64)
    ann_xywh = np.zeros((n, 4), np.float64)
    ann_crowd = np.zeros(n, np.int64)
    ann_area = np.full(n, np.nan, np.float64)
    ignore_region = np.zeros(n, bool)
    segmentations: list = [None] * n
    has_segmentation = False
    extras: dict[str, list] = {}
    seen_ids: dict[int, int] = {}
    stray = np.zeros(n, bool)  # annotations to leave out (their image is bad or unknown)
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise DatasetError("malformed_label", f"{where} must be an object, got {ann!r}", path)
        ann_id, image_id, category_id = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not _is_int(ann_id):
            raise DatasetError("malformed_label", f"{where} needs an int 'id', got {ann_id!r}", path)
        where = f"annotations[{i}] (id {ann_id})"
        if ann_id in seen_ids:
            raise DatasetError("inconsistent_ids", f"{where}: annotation id {ann_id} is also used by "
                               f"annotations[{seen_ids[ann_id]}]", path)
        seen_ids[ann_id] = i
        if not _is_int(image_id) or image_id not in image_info:
            stray[i] = True
            collect(DatasetError("inconsistent_ids", f"{where} refers to image_id {image_id!r}, which is not in "
                                 "'images'", path))
            continue
        bbox = ann.get("bbox")
        problem = None
        if category_id not in label_of:
            problem = DatasetError("unknown_class", f"{where} has category_id {category_id!r}, which is not in "
                                   f"'categories' (ids {category_ids})", path)
        elif (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
              or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            problem = DatasetError("malformed_label", f"{where} needs 'bbox' = [x, y, width, height], got {bbox!r}",
                                   path)
        if problem is not None:
            collect(problem)
            bad_images.add(image_id)
            stray[i] = True
            continue
        ann_ids[i], ann_image[i], ann_label[i] = ann_id, image_id, label_of[category_id]
        ann_xywh[i] = bbox
        ann_crowd[i] = int(bool(ann.get("iscrowd", 0)))
        area = ann.get("area")
        if isinstance(area, (int, float)) and not isinstance(area, bool):
            ann_area[i] = area
        ignore_region[i] = bool(ann.get("ignore_region", 0))
        segmentation = ann.get("segmentation")
        if segmentation is not None and segmentation != []:
            reason = check_segmentation(segmentation)
            if reason is not None:
                collect(DatasetError("malformed_label", f"{where}: {reason}", path))
                bad_images.add(image_id)
                stray[i] = True
                continue
            segmentations[i] = segmentation
            has_segmentation = True
        for name in _EXTRA_ATTRIBUTES:
            if name in ann:
                extras.setdefault(name, [None] * n)[i] = ann[name]

    # Vectorised box checks, per image size.
    sizes = {}
    for image_id, image in image_info.items():
        sizes[image_id] = image.get("_size") or (image.get("width"), image.get("height"))
    valid = ~stray
    widths = np.array([sizes[i][0] if i in sizes else 0 for i in ann_image.tolist()], np.float32)
    heights = np.array([sizes[i][1] if i in sizes else 0 for i in ann_image.tolist()], np.float32)
    xyxy = np.concatenate([ann_xywh[:, :2], ann_xywh[:, :2] + ann_xywh[:, 2:]], axis=1).astype(np.float32)
    clipped = xyxy.copy()
    for image_id in np.unique(ann_image[valid]).tolist():  # one call per image, all its boxes at once
        rows = np.flatnonzero(valid & (ann_image == image_id))
        w, h = sizes[image_id]
        clipped_rows, bad, reasons = check_boxes(xyxy[rows], int(w), int(h))
        clipped[rows] = clipped_rows
        for j in np.flatnonzero(bad).tolist():
            file_name = image_info[image_id]["file_name"]
            bbox = ", ".join(f"{v:g}" for v in ann_xywh[rows[j]].tolist())
            collect(DatasetError("bad_box", f"annotations[{rows[j]}] (id {ann_ids[rows[j]]}) of image {image_id} "
                                 f"({file_name!r}): bbox [{bbox}] (x, y, w, h): {reasons[j]}", path))
            bad_images.add(image_id)

    # Group into records.
    attribute_arrays: dict[str, np.ndarray] = {}
    for name, values in extras.items():
        dtype, default, shape = OBJECT_ATTRIBUTES[name]
        filled = [default if v is None else v for v in values]
        try:
            attribute_arrays[name] = np.asarray(filled, dtype=dtype).reshape(n, *shape)
        except (TypeError, ValueError):
            raise DatasetError("malformed_label", f"annotation field {name!r} must hold "
                               f"{'a number' if not shape else f'{shape[0]} numbers'} in every annotation", path) \
                from None
    keep = valid & ~np.isin(ann_image, np.fromiter(bad_images, np.int64, len(bad_images)))
    records = []
    order = np.argsort(ann_image, kind="stable")
    sorted_images = ann_image[order]
    for image_id, image in image_info.items():
        if image_id in bad_images:
            continue
        lo, hi = np.searchsorted(sorted_images, [image_id, image_id + 1])
        rows = order[lo:hi]
        rows = rows[keep[rows]]
        objects = rows[~ignore_region[rows]]
        regions = rows[ignore_region[rows]]
        width, height = sizes[image_id]
        attributes = {"iscrowd": ann_crowd[objects]}
        areas = ann_area[objects]
        if not np.isnan(areas).all():
            box_areas = (clipped[objects, 2] - clipped[objects, 0]) * (clipped[objects, 3] - clipped[objects, 1])
            attributes["area"] = np.where(np.isnan(areas), box_areas, areas).astype(np.float32)
        for name, values in attribute_arrays.items():
            attributes[name] = values[objects]
        region_boxes = np.unique(clipped[regions], axis=0) if regions.size else np.zeros((0, 4), np.float32)
        image_regions = image.get("ignore_regions")
        if image_regions:
            try:
                r = np.asarray(image_regions, dtype=np.float32).reshape(-1, 4)
            except (TypeError, ValueError):
                raise DatasetError("malformed_label", f"image {image_id}: 'ignore_regions' must be a list of "
                                   "[x, y, w, h]", path) from None
            r = np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)
            region_boxes = np.unique(np.concatenate([region_boxes, r]), axis=0)
        records.append(ImageRecord(file_name=image["file_name"], image_id=image_id, width=int(width),
                                   height=int(height), boxes=clipped[objects], labels=ann_label[objects],
                                   attributes=attributes, ignore_boxes=region_boxes,
                                   segmentations=[segmentations[j] for j in objects.tolist()]
                                   if has_segmentation else None))
    report = collect.finish("CocoDetection", path, len(image_info))
    return records, class_names, category_ids, report


class CocoDetection(DetectionDataset):
    """A COCO-format detection dataset: ``annotation_file`` (instances JSON) with images under ``image_root``.

    Args:
        image_root: folder that the JSON's ``file_name`` entries are relative to.
        annotation_file: the instances JSON.
        transforms: optional ``(image, target) -> (image, target)`` callable (see :mod:`fastdet.data.transforms`).
        skip_bad: leave out images with a problem (missing or unreadable file, bad box, unknown category, ...)
            instead of raising; ``dataset.skipped`` lists what was left out and a warning summarises it.
        verify_images: open every image header while loading the index (default: same as ``skip_bad``).

    Crowd annotations (``iscrowd=1``) are kept as boxes with ``target["iscrowd"] == 1``; the caller decides whether the
    model trains on them. See :class:`fastdet.data._base.DetectionDataset` for the sample layout.
    """

    format_name = "coco"

    def __init__(self, image_root: str | Path, annotation_file: str | Path, transforms: Callable | None = None,
                 skip_bad: bool = False, verify_images: bool | None = None):
        records, class_names, category_ids, skipped = read_coco(annotation_file, image_root, skip_bad, verify_images)
        self.annotation_file = Path(annotation_file)
        super().__init__(records, image_root, class_names, category_ids, transforms, skipped, annotation_file)


def to_coco_dict(dataset: DetectionDataset | Sequence[ImageRecord], categories: Sequence[dict] | None = None,
                 ignore_regions_as_crowd: bool = False) -> dict:
    """Ground truth as a COCO instances dict (``images``, ``annotations``, ``categories``) for pycocotools.

    ``dataset`` is a :class:`DetectionDataset` (its categories are used) or a list of :class:`ImageRecord` together
    with ``categories`` (``[{"id", "name"}]`` in label order). Boxes become ``bbox = [x, y, w, h]``; ``area`` is the
    source's area where it had one, else the box area; ``iscrowd`` is 0 unless the source says otherwise; extra
    attributes (``difficult``, KITTI fields) are kept as extra keys. Annotation ids run 1, 2, ... in record order.

    Ignore regions (KITTI ``DontCare``) are written as the image's ``ignore_regions``. pycocotools does not read that
    field; with ``ignore_regions_as_crowd=True`` each region is also written once per category as an ``iscrowd=1``
    annotation marked ``"ignore_region": 1``, which makes pycocotools ignore detections inside it, as KITTI's own
    evaluation does. (:func:`read_coco` turns such annotations back into ignore regions.)
    """
    if isinstance(dataset, DetectionDataset):
        records = dataset.records
        categories = dataset.categories
    else:
        records = list(dataset)
        if categories is None:
            raise ValueError("categories is required when dataset is a list of records")
    category_ids = np.array([int(c["id"]) for c in categories], np.int64)
    images, annotations = [], []
    next_id = 1
    for record in records:
        image = {"id": int(record.image_id), "file_name": record.file_name, "width": int(record.width),
                 "height": int(record.height)}
        if len(record.ignore_boxes):
            image["ignore_regions"] = _xywh(record.ignore_boxes)
        images.append(image)
        n = len(record.boxes)
        if n:
            bbox = _xywh(record.boxes)
            area = record.attribute("area").astype(np.float64).tolist()
            iscrowd = record.attribute("iscrowd").tolist()
            cats = category_ids[record.labels - 1].tolist()
            # Extra attributes are written only where they say something: a column equal to the format-neutral
            # default everywhere (e.g. KITTI's "no 3-D annotation" values) reads back identically without it.
            extra_columns = [(name, values.tolist()) for name, values in record.attributes.items()
                             if name in _EXTRA_ATTRIBUTES and not _all_default(name, values)]
            for j in range(n):
                ann = {"id": next_id + j, "image_id": int(record.image_id), "category_id": cats[j], "bbox": bbox[j],
                       "area": area[j], "iscrowd": int(iscrowd[j])}
                for name, values in extra_columns:
                    ann[name] = values[j]
                if record.segmentations is not None and record.segmentations[j] is not None:
                    ann["segmentation"] = record.segmentations[j]
                annotations.append(ann)
            next_id += n
        if ignore_regions_as_crowd and len(record.ignore_boxes):
            for box in _xywh(record.ignore_boxes):
                for cid in category_ids.tolist():
                    annotations.append({"id": next_id, "image_id": int(record.image_id), "category_id": cid,
                                        "bbox": box, "area": float(box[2] * box[3]), "iscrowd": 1,
                                        "ignore_region": 1})
                    next_id += 1
    return {
        "info": {"description": "written by fastdet.data"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c["id"]), "name": str(c["name"]), "supercategory": str(c.get("supercategory", ""))}
                       for c in categories],
    }


def _all_default(name: str, values: np.ndarray) -> bool:
    dtype, default, shape = OBJECT_ATTRIBUTES[name]
    return bool((np.asarray(values, dtype=dtype) == np.asarray(default, dtype=dtype)).all())


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    b = boxes.astype(np.float64)
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    # float32 boxes printed through float64 give long tails (0.1 -> 0.10000000149); round to float32's precision.
    return [[float(f"{v:.7g}") if math.isfinite(v) else v for v in row] for row in xywh.tolist()]


def write_coco_json(path: str | Path, coco: dict) -> Path:
    """Write a COCO dict as JSON (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    return path


def _split_name(annotation_file: Path) -> str:
    stem = annotation_file.stem
    return stem[len("instances_"):] if stem.startswith("instances_") and len(stem) > len("instances_") else stem


def read_coco_dataset(src: str | Path, skip_bad: bool = False, image_root: str | Path | None = None,
                      verify_images: bool | None = None) -> DatasetContents:
    """Read a COCO dataset with all its splits, for converters.

    ``src`` is either one instances JSON (split name from ``instances_<split>.json``, else the file's stem) or a folder
    holding ``annotations/*.json`` (one split per file) and ``images/``. Images are looked up under ``image_root``,
    default ``<folder>/images`` when it exists, else the folder (for a JSON inside ``annotations/``, the folder is
    the one above). All files must share the same categories.
    """
    src = Path(src)
    if src.is_file() or src.suffix == ".json":
        files = [src]
        folder = src.parent.parent if src.parent.name == "annotations" else src.parent
    elif src.is_dir():
        folder = src
        files = sorted((src / "annotations").glob("*.json")) or sorted(src.glob("*.json"))
        if not files:
            raise DatasetError("missing_label", "no annotations/*.json found", src)
    else:
        raise DatasetError("missing_label", "dataset not found", src)
    if image_root is None:
        image_root = folder / "images" if (folder / "images").is_dir() else folder
    image_root = Path(image_root)
    records: list[ImageRecord] = []
    paths: list[Path] = []
    splits: dict[str, np.ndarray] = {}
    skipped = SkipReport()
    class_names = category_ids = None
    index_of: dict[tuple[int, str], int] = {}
    for file in files:
        split_records, names, ids, report = read_coco(file, image_root, skip_bad, verify_images)
        if class_names is None:
            class_names, category_ids = names, ids
        elif (names, ids) != (class_names, category_ids):
            raise DatasetError("inconsistent_ids", f"categories differ from those of {files[0].name}", file)
        skipped.problems.extend(report.problems)
        skipped.total += report.total
        indices = []
        for record in split_records:
            key = (record.image_id, record.file_name)
            if key not in index_of:
                index_of[key] = len(records)
                records.append(record)
                paths.append(image_root / record.file_name)
            indices.append(index_of[key])
        name = _split_name(file)
        if name in splits:
            raise DatasetError("inconsistent_ids", f"two annotation files give split {name!r}", file)
        splits[name] = np.asarray(indices, np.int64)
    return DatasetContents(records, paths, class_names, category_ids, splits, skipped, folder)


def write_coco(contents: DatasetContents, dst: str | Path, copy_image: Callable[[Path, Path], None]) -> list[str]:
    """Write ``contents`` as ``dst/images/<file_name>`` and ``dst/annotations/instances_<split>.json``."""
    dst = Path(dst)
    categories = [{"id": cid, "name": name} for cid, name in zip(contents.category_ids, contents.class_names)]
    for i, record in enumerate(contents.records):
        copy_image(contents.image_paths[i], dst / "images" / record.file_name)
    for split, indices in contents.splits.items():
        coco = to_coco_dict([contents.records[i] for i in indices.tolist()], categories)
        write_coco_json(dst / "annotations" / f"instances_{split}.json", coco)
    return []
