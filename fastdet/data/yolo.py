"""YOLO txt labels (the Ultralytics/Darknet layout).

Layout: ``root/data.yaml`` with ``names`` (a list, or a dict ``{index: name}``) and split entries ``train`` / ``val`` /
``test``, each a folder of images or a ``.txt`` list of image paths, relative to ``path`` (itself relative to the
yaml's folder) or to the yaml's folder. Without split entries the images are ``root/images/**``. The label file of
``.../images/<sub>/<stem>.<ext>`` is ``.../labels/<sub>/<stem>.txt`` (the last ``images`` folder swapped for
``labels``); each line is ``class cx cy w h`` with a 0-based class and coordinates normalised by the image size, or
``class x1 y1 x2 y2 x3 y3 ...`` (Ultralytics' segmentation labels: a polygon, normalised the same way, whose bounding
box is the object's box and which is kept as the object's instance segmentation).

Segmentation labels read into ``ImageRecord.segmentations`` as one-part COCO polygons in pixels (a box line in a
dataset that has polygons gets ``None``: its mask is its box). Writing a record with segmentations writes polygon lines:
COCO polygons with several parts are joined into one outline, RLE masks (e.g. the synthetic shapes' or COCO's crowd
annotations) are traced along their pixel boundary (:func:`fastdet.data.masks.mask_to_polygon`, which pycocotools
rasterises back to the same mask) and an object without a segmentation is written as its box's outline, so every
line of a segmentation dataset is a polygon, as Ultralytics expects.

YOLO stores no image ids, crowd or difficult flags, ignore regions or category ids: the class index ``c`` becomes label
``c + 1`` and category id ``c + 1``; image ids come from the file names (:func:`image_ids_from_names`).
A missing label file is an error unless ``allow_missing_labels=True`` (then the image has no objects, the Ultralytics
convention for background images); an empty label file always means no objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from fastdet.data._base import (
    DatasetContents,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    ProblemCollector,
    check_boxes,
    check_class_names,
    image_ids_from_names,
    list_images,
    read_image_size,
    read_label_text,
)
from fastdet.data.masks import decode_segmentation, join_polygons, mask_to_polygon

SPLIT_KEYS = ("train", "val", "test")


def label_path_for(image_path: Path) -> Path:
    """``.../images/a/b.jpg -> .../labels/a/b.txt`` (the last ``images`` component is swapped)."""
    parts = list(image_path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image_path.with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DatasetError("malformed_label", f"invalid YAML: {exc}", path,
                           None if mark is None else mark.line + 1) from None
    if not isinstance(data, dict):
        raise DatasetError("malformed_label", "expected a mapping (names:, train:, val:, ...)", path)
    return data


def _names_from_yaml(data: dict, path: Path) -> list[str] | None:
    names = data.get("names")
    if names is None:
        return None
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DatasetError("malformed_label", f"'names' keys must be 0..{len(keys) - 1}, got {keys}", path)
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DatasetError("malformed_label", f"'names' must be a list of class names, got {names!r}", path)
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError("malformed_label", f"nc is {data['nc']} but 'names' has {len(names)} entries", path)
    if len(set(names)) != len(names):
        raise DatasetError("malformed_label", "class names must be distinct", path)
    return names


def _split_images(entry, base: Path, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise DatasetError("malformed_label", f"split entries must be paths, got {item!r}", yaml_path)
        target = Path(item) if Path(item).is_absolute() else base / item
        if target.is_dir():
            images.extend(list_images(target))
        elif target.suffix == ".txt" and target.is_file():
            for line in target.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else base / p)
        else:
            raise DatasetError("missing_image", f"split folder or list {item!r} not found (looked for {target})",
                               yaml_path)
    return images


def _parse_label_file(path: Path, num_classes: int, width: int, height: int):
    """Pixel xyxy boxes, 0-based classes and per-object pixel polygons (None for box lines, None overall when the file
    has no polygon line) of one label file; raises DatasetError naming the line."""
    text = read_label_text(path)
    boxes, classes, lines, polygons = [], [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
            raise DatasetError("malformed_label", f"expected 'class cx cy w h' (or 'class' and polygon x y pairs), "
                               f"got {len(fields)} fields: {line.strip()!r}", path, line_number)
        try:
            cls = int(fields[0])
            values = np.array([float(v) for v in fields[1:]], np.float64)
        except ValueError:
            raise DatasetError("malformed_label", f"fields must be an int class and numbers: {line.strip()!r}",
                               path, line_number) from None
        if not 0 <= cls < num_classes:
            raise DatasetError("unknown_class", f"class {cls} is not in 0..{num_classes - 1} (data.yaml names)",
                               path, line_number)
        if len(values) == 4:
            cx, cy, w, h = values
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            polygons.append(None)
        else:
            if not np.isfinite(values).all():
                raise DatasetError("malformed_label", f"polygon coordinates must be finite: {line.strip()!r}",
                                   path, line_number)
            xy = values.reshape(-1, 2)
            box = [*xy.min(axis=0), *xy.max(axis=0)]
            polygons.append([[float(v) for v in (xy * (width, height)).reshape(-1)]])
        boxes.append(box)
        classes.append(cls)
        lines.append(line_number)
    scale = np.array([width, height, width, height], np.float64)
    pixel_boxes = (np.asarray(boxes, np.float64).reshape(-1, 4) * scale).astype(np.float32)
    clipped, bad, reasons = check_boxes(pixel_boxes, width, height)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DatasetError("bad_box", reasons[j], path, lines[j])
    segmentations = polygons if any(p is not None for p in polygons) else None
    return clipped, np.asarray(classes, np.int64), segmentations


def read_yolo(root: str | Path, class_names: Sequence[str] | None = None, skip_bad: bool = False,
              allow_missing_labels: bool = False) -> DatasetContents:
    """Read a YOLO dataset (all splits). ``root`` is the folder holding ``data.yaml`` (or the yaml file itself)."""
    root = Path(root)
    yaml_path = root if root.suffix in (".yaml", ".yml") else root / "data.yaml"
    root = yaml_path.parent
    data = _read_yaml(yaml_path) if yaml_path.is_file() else {}
    names = class_names if class_names is not None else _names_from_yaml(data, yaml_path)
    names = check_class_names(names, f"{yaml_path} (YOLO 'names')")
    base = Path(data["path"]) if isinstance(data.get("path"), str) else root
    if not base.is_absolute():
        base = root / base
    split_lists: dict[str, list[Path]] = {}
    for key in SPLIT_KEYS:
        if data.get(key):
            split_lists[key] = _split_images(data[key], base, yaml_path)
    if not split_lists:
        split_lists["all"] = list_images(root / "images")
    collect = ProblemCollector(skip_bad)
    # One record per distinct image file, however many splits list it.
    unique: dict[Path, int] = {}
    order: list[Path] = []
    rel_names: list[str] = []
    for key, images in split_lists.items():
        for image in images:
            resolved = image.resolve()
            if resolved not in unique:
                unique[resolved] = len(order)
                order.append(image)
                split_dir = _images_dir_of(image)
                rel_names.append(image.relative_to(split_dir).as_posix() if split_dir else image.name)
    ids = image_ids_from_names(rel_names)
    records, paths, index_of = [], [], {}
    for i, image in enumerate(order):
        try:
            width, height = read_image_size(image)
            label_file = label_path_for(image)
            if allow_missing_labels and not label_file.exists():
                boxes, classes, segmentations = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), None
            else:
                boxes, classes, segmentations = _parse_label_file(label_file, len(names), width, height)
        except DatasetError as error:
            collect(error)
            continue
        index_of[i] = len(records)
        records.append(ImageRecord(file_name=rel_names[i], image_id=int(ids[i]), width=width, height=height,
                                   boxes=boxes, labels=classes + 1, segmentations=segmentations))
        paths.append(image)
    splits = {key: np.array([index_of[unique[p.resolve()]] for p in images if unique[p.resolve()] in index_of],
                            np.int64) for key, images in split_lists.items()}
    report = collect.finish("YoloDetection", yaml_path, len(order))
    return DatasetContents(records, paths, names, list(range(1, len(names) + 1)), splits, report, root)


def _images_dir_of(image: Path) -> Path | None:
    parts = image.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            # file names are relative to images/<split>/ when the split folder sits right under images/
            j = i + 2 if len(parts) - i > 2 and parts[i + 1] in SPLIT_KEYS else i + 1
            return Path(*parts[:j])
    return image.parent


class YoloDetection(DetectionDataset):
    """A YOLO-format dataset (see the module docstring for the layout).

    Args:
        root: the folder holding ``data.yaml`` (or the yaml file).
        split: ``"train"``, ``"val"``, ``"test"`` (as listed in data.yaml) or None for every image.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        skip_bad: leave out images with a problem instead of raising (see ``.skipped``).
        class_names: overrides data.yaml's ``names``.
        allow_missing_labels: an image without a label file has no objects (instead of being an error).
    """

    format_name = "yolo"

    def __init__(self, root: str | Path, split: str | None = None, transforms: Callable | None = None,
                 skip_bad: bool = False, class_names: Sequence[str] | None = None,
                 allow_missing_labels: bool = False):
        contents = read_yolo(root, class_names, skip_bad, allow_missing_labels)
        records, paths = contents.select(split)
        self.split = split
        super().__init__(records, contents.source / "images", contents.class_names, contents.category_ids,
                         transforms, contents.skipped, contents.source, image_paths=paths)


def _format_number(value: float) -> str:
    text = f"{value:.7f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def segmentation_outline(segmentation, box, height: int, width: int) -> list[float]:
    """The single pixel polygon YOLO segmentation txt stores for one object (see the module docstring)."""
    if segmentation is None:
        x1, y1, x2, y2 = box
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if isinstance(segmentation, list):
        return join_polygons(segmentation)
    outline = mask_to_polygon(decode_segmentation(segmentation, height, width))
    if not outline:  # an empty mask: keep the object, as its box
        return segmentation_outline(None, box, height, width)
    return outline


def write_yolo(contents: DatasetContents, dst: str | Path, copy_image: Callable[[Path, Path], None]) -> list[str]:
    """Write ``contents`` as a YOLO dataset under ``dst``: ``images/<split>/``, ``labels/<split>/`` (an empty file for
    an image without objects) and ``data.yaml``. Returns notes on what YOLO could not hold."""
    dst = Path(dst)
    notes: list[str] = []
    yaml_data: dict = {"path": ".", "nc": len(contents.class_names),
                       "names": {i: name for i, name in enumerate(contents.class_names)}}
    flat = list(contents.splits) == ["all"]  # a source without splits: images/ and labels/ directly
    for split, indices in contents.splits.items():
        folder = "images" if flat else f"images/{split}"
        if not flat:
            yaml_data[split] = folder
        for i in indices.tolist():
            record = contents.records[i]
            image_dst = dst / folder / record.file_name
            copy_image(contents.image_paths[i], image_dst)
            label_dst = label_path_for(image_dst)
            label_dst.parent.mkdir(parents=True, exist_ok=True)
            b = record.boxes.astype(np.float64)
            scale = np.array([record.width, record.height], np.float64)
            if record.segmentations is not None:
                outlines = [segmentation_outline(seg, box, record.height, record.width)
                            for seg, box in zip(record.segmentations, b.tolist())]
                values = [(np.asarray(o, np.float64).reshape(-1, 2) / scale).reshape(-1).tolist() for o in outlines]
            else:
                centre = (b[:, :2] + b[:, 2:]) / 2 / scale
                size = (b[:, 2:] - b[:, :2]) / scale
                values = [[*ctr, *wh] for ctr, wh in zip(centre.tolist(), size.tolist())]
            lines = [" ".join([str(int(c) - 1), *(_format_number(v) for v in row)])
                     for c, row in zip(record.labels.tolist(), values)]
            label_dst.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if flat:
        yaml_data["train"] = yaml_data["val"] = "images"
        notes.append("the source has no splits: data.yaml's 'train' and 'val' both name images/")
    elif "train" not in yaml_data:  # Ultralytics requires train and val entries
        first = next(iter(contents.splits), None)
        if first is not None:
            yaml_data["train"] = yaml_data[first]
            notes.append(f"data.yaml: no 'train' split in the source; 'train' points at split {first!r}")
    if "val" not in yaml_data and "train" in yaml_data:
        yaml_data["val"] = yaml_data["train"]
        notes.append("data.yaml: no 'val' split in the source; 'val' points at the training images")
    (dst / "data.yaml").write_text(yaml.safe_dump(yaml_data, sort_keys=False), encoding="utf-8")
    return notes
