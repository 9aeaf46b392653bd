"""KITTI object labels (the 2-D boxes of the object-detection benchmark).

Layout: ``root/image_2/<stem>.png`` and ``root/label_2/<stem>.txt`` (``root`` is KITTI's ``training`` folder), optional
``root/ImageSets/<split>.txt`` (one stem per line) and optional ``root/classes.txt`` (class names in label order,
written by fastdet). Each label line is
``type truncated occluded alpha left top right bottom height width length x y z rotation_y [score]``.

* ``left top right bottom`` are the box in pixels, read as ``x1 y1 x2 y2``.
* ``DontCare`` lines are regions without usable labels; they become ``target["ignore_boxes"]`` (detections there are
  neither rewarded nor punished), not objects.
* ``truncated`` (0..1), ``occluded`` (0..3), ``alpha``, the 3-D ``dimensions`` (h, w, l), ``location`` (x, y, z) and
  ``rotation_y`` are kept as per-object attributes, so converting KITTI through COCO back to KITTI is lossless.
* Classes default to KITTI's eight (:data:`KITTI_CLASSES`); a label of another type is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastdet.data._base import (
    DatasetContents,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    ProblemCollector,
    check_boxes,
    check_class_names,
    find_image,
    image_ids_from_names,
    list_images,
    read_class_list,
    read_label_text,
    read_image_size,
)

KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
DONT_CARE = "DontCare"


def _parse_label_file(path: Path, label_of: dict[str, int], width: int, height: int):
    text = read_label_text(path)
    names, rows, lines = [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise DatasetError("malformed_label", f"expected 15 fields (type truncated occluded alpha left top right "
                               f"bottom h w l x y z rotation_y), got {len(fields)}: {line.strip()!r}", path,
                               line_number)
        try:
            values = [float(v) for v in fields[1:15]]
        except ValueError:
            raise DatasetError("malformed_label", f"fields 2-15 must be numbers: {line.strip()!r}", path,
                               line_number) from None
        if fields[0] != DONT_CARE and fields[0] not in label_of:
            raise DatasetError("unknown_class", f"type {fields[0]!r} is not one of {list(label_of)} (or DontCare)",
                               path, line_number)
        names.append(fields[0])
        rows.append(values)
        lines.append(line_number)
    table = np.asarray(rows, np.float32).reshape(-1, 14)
    clipped, bad, reasons = check_boxes(table[:, 3:7], width, height)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DatasetError("bad_box", f"{names[j]}: {reasons[j]}", path, lines[j])
    is_object = np.array([n != DONT_CARE for n in names], bool)
    objects = table[is_object]
    labels = np.array([label_of[n] for n in names if n != DONT_CARE], np.int64)
    attributes = {
        "truncated": objects[:, 0].copy(),
        "occluded": objects[:, 1].astype(np.int64),
        "alpha": objects[:, 2].copy(),
        "dimensions": objects[:, 7:10].copy(),
        "location": objects[:, 10:13].copy(),
        "rotation_y": objects[:, 13].copy(),
    }
    return clipped[is_object], labels, attributes, clipped[~is_object]


def read_kitti(root: str | Path, class_names: Sequence[str] | None = None, skip_bad: bool = False) -> DatasetContents:
    """Read a KITTI object dataset (all splits listed in ``ImageSets/``, else every image in ``image_2``)."""
    root = Path(root)
    image_dir, label_dir = root / "image_2", root / "label_2"
    if not image_dir.is_dir():
        raise DatasetError("missing_image", "no image_2/ folder (pass KITTI's 'training' folder)", root)
    if class_names is None:
        class_names = read_class_list(root / "classes.txt") or list(KITTI_CLASSES)
    names = check_class_names(class_names, f"{root} (KITTI)")
    bad_names = [n for n in names if n == DONT_CARE or len(n.split()) != 1 or n != n.strip()]
    if bad_names:
        raise ValueError(f"KITTI class names must be single words other than DontCare, got {bad_names}")
    label_of = {name: label for label, name in enumerate(names, start=1)}
    split_stems: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        path = root / "ImageSets" / f"{split}.txt"
        if path.is_file():
            split_stems[split] = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines()
                                  if line.strip()]
    if not split_stems:
        split_stems["all"] = [p.relative_to(image_dir).with_suffix("").as_posix() for p in list_images(image_dir)]
    ordered = list(dict.fromkeys(s for stems in split_stems.values() for s in stems))
    collect = ProblemCollector(skip_bad)
    image_paths = [find_image(image_dir, stem) for stem in ordered]
    file_names = [p.relative_to(image_dir).as_posix() if p else f"{s}.png" for p, s in zip(image_paths, ordered)]
    ids = image_ids_from_names(file_names)
    records, paths, index_of = [], [], {}
    for k, stem in enumerate(ordered):
        try:
            if image_paths[k] is None:
                raise DatasetError("missing_image", f"no image file for {stem!r} in image_2/", label_dir / f"{stem}.txt")
            width, height = read_image_size(image_paths[k])
            boxes, labels, attributes, ignore = _parse_label_file(label_dir / f"{stem}.txt", label_of, width, height)
        except DatasetError as error:
            collect(error)
            continue
        index_of[stem] = len(records)
        records.append(ImageRecord(file_name=file_names[k], image_id=int(ids[k]), width=width, height=height,
                                   boxes=boxes, labels=labels, attributes=attributes, ignore_boxes=ignore))
        paths.append(image_paths[k])
    splits = {name: np.array([index_of[s] for s in stems if s in index_of], np.int64)
              for name, stems in split_stems.items()}
    report = collect.finish("KittiDetection", root, len(ordered))
    return DatasetContents(records, paths, names, list(range(1, len(names) + 1)), splits, report, root)


class KittiDetection(DetectionDataset):
    """A KITTI object-detection dataset (see the module docstring).

    Args:
        root: KITTI's ``training`` folder (holding ``image_2/`` and ``label_2/``).
        split: a name from ``ImageSets/`` or None for every image.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        skip_bad: leave out images with a problem instead of raising (see ``.skipped``).
        class_names: object types in label order (default: ``classes.txt``, else :data:`KITTI_CLASSES`).
    """

    format_name = "kitti"

    def __init__(self, root: str | Path, split: str | None = None, transforms: Callable | None = None,
                 skip_bad: bool = False, class_names: Sequence[str] | None = None):
        contents = read_kitti(root, class_names, skip_bad)
        records, paths = contents.select(split)
        self.split = split
        super().__init__(records, Path(root) / "image_2", contents.class_names, contents.category_ids, transforms,
                         contents.skipped, root, image_paths=paths)


def _fmt(values: np.ndarray) -> list[str]:
    return [f"{v:.2f}" if abs(v - round(v, 2)) < 1e-6 else f"{v:.7g}" for v in values.astype(np.float64).tolist()]


def write_kitti(contents: DatasetContents, dst: str | Path, copy_image: Callable[[Path, Path], None]) -> list[str]:
    """Write ``contents`` as KITTI under ``dst`` (``image_2/``, ``label_2/``, ``ImageSets/<split>.txt``,
    ``classes.txt``). Class names that are not single words have their spaces replaced by ``_``. Returns notes."""
    dst = Path(dst)
    notes: list[str] = []
    names = []
    for name in contents.class_names:
        safe = "_".join(name.split()) or "unnamed"
        if safe == DONT_CARE:
            safe = "DontCare_class"
        if safe != name:
            notes.append(f"class {name!r} written as {safe!r} (KITTI types are single words)")
        names.append(safe)
    if len(set(names)) != len(names):
        raise ValueError(f"class names {contents.class_names} collide once made KITTI-safe: {names}")
    (dst / "label_2").mkdir(parents=True, exist_ok=True)
    (dst / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    for i, record in enumerate(contents.records):
        stem = record.stem
        copy_image(contents.image_paths[i], dst / "image_2" / record.file_name)
        n = len(record.boxes)
        columns = np.concatenate([
            record.attribute("truncated").reshape(n, 1), record.attribute("occluded").reshape(n, 1),
            record.attribute("alpha").reshape(n, 1), record.boxes, record.attribute("dimensions").reshape(n, 3),
            record.attribute("location").reshape(n, 3), record.attribute("rotation_y").reshape(n, 1)], axis=1)
        lines = []
        for label, row in zip(record.labels.tolist(), columns):
            values = _fmt(row)
            values[1] = str(int(row[1]))  # occluded is an integer state
            lines.append(" ".join([names[label - 1], *values]))
        for box in record.ignore_boxes:
            lines.append(" ".join([DONT_CARE, "-1", "-1", "-10", *_fmt(box), "-1", "-1", "-1", "-1000", "-1000",
                                   "-1000", "-10"]))
        label_path = dst / "label_2" / f"{stem}.txt"
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for split, indices in contents.splits.items():
        if split == "all":
            continue
        (dst / "ImageSets").mkdir(parents=True, exist_ok=True)
        stems = [contents.records[i].stem for i in indices.tolist()]
        (dst / "ImageSets" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems), encoding="utf-8")
    return notes

