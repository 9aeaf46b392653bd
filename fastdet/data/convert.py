"""Converting between COCO, YOLO, Pascal VOC and KITTI, and re-splitting a dataset.

Both entry points read the whole source (every split), copy the images and write the target layout:

* :func:`convert_dataset` keeps the source's splits;
* :func:`split_dataset` pools every image and draws a fresh, seeded train/val/test split.

Each returns a :class:`ConversionReport`: counts, and in ``lost`` every kind of information the target format cannot
hold, with how many objects or images it concerns (e.g. YOLO has no crowd or difficult flag: such objects are written
as ordinary objects and counted there). Objects are never dropped: a source problem raises :class:`DatasetError`
unless ``skip_bad=True``, in which case the affected images are left out and listed in ``report.skipped``.
What each format holds (beyond boxes and classes):

======== ======= ========= ============ ============= ============= ============ ===========
format   iscrowd difficult truncated    KITTI 3-D/occ ignore region category ids image ids
======== ======= ========= ============ ============= ============= ============ ===========
coco     yes     yes*      yes*         yes*          yes*          yes          yes
voc      no      yes       0/1 only     no            no            no (1..K)    from names
yolo     no      no        no           no            no            no (1..K)    from names
kitti    no      no        yes          yes           yes           no (1..K)    from names
======== ======= ========= ============ ============= ============= ============ ===========

(*) as extra fields that fastdet reads back and pycocotools ignores. "From names": the format stores no image ids;
reading gives each image the number in its file name when every name is a number (``000123.png``), else 1..N.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastdet.data._base import OBJECT_ATTRIBUTES, DatasetContents, SkipReport, box_area, image_ids_from_names
from fastdet.data.coco import read_coco_dataset, write_coco
from fastdet.data.kitti import read_kitti, write_kitti
from fastdet.data.split import DEFAULT_RATIOS, DEFAULT_SPLIT_NAMES, check_ratios, split_indices
from fastdet.data.voc import read_voc, write_voc
from fastdet.data.yolo import read_yolo, write_yolo

FORMATS = ("coco", "yolo", "voc", "kitti")

# Which per-object attributes each format can store, and how ("exact" or "binary": only 0/1).
_HOLDS = {
    "coco": {name: "exact" for name in OBJECT_ATTRIBUTES} | {"ignore_boxes": "exact", "category_ids": "exact",
                                                               "image_ids": "exact"},
    "voc": {"difficult": "exact", "truncated": "binary"},
    "yolo": {},
    "kitti": {"truncated": "exact", "occluded": "exact", "alpha": "exact", "dimensions": "exact",
              "location": "exact", "rotation_y": "exact", "ignore_boxes": "exact"},
}


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did. ``lost`` lists what the target format could not hold (empty: lossless)."""

    src: Path
    src_format: str
    dst: Path
    dst_format: str
    num_images: int = 0
    num_objects: int = 0
    num_ignore_regions: int = 0
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    lost: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)

    @property
    def lossless(self) -> bool:
        return not self.lost and not self.skipped.count

    def __str__(self) -> str:
        splits = ", ".join(f"{k}: {v}" for k, v in self.splits.items())
        lines = [f"{self.src_format} {self.src} -> {self.dst_format} {self.dst}: {self.num_images} images "
                 f"({splits}), {self.num_objects} objects, {self.num_ignore_regions} ignore regions"]
        lines += [f"  lost: {item}" for item in self.lost]
        lines += [f"  note: {item}" for item in self.notes]
        if self.skipped.count:
            lines.append(f"  skipped: {self.skipped.summary()}")
        return "\n".join(lines)


def _check_format(value: str, argument: str) -> str:
    if not isinstance(value, str) or value.lower() not in FORMATS:
        raise ValueError(f"{argument} must be one of {FORMATS}, got {value!r}")
    return value.lower()


def read_dataset(src: str | Path, format: str, skip_bad: bool = False,
                 class_names: Sequence[str] | None = None) -> DatasetContents:
    """Read a dataset on disk, every split, in one of :data:`FORMATS`. ``class_names`` overrides the format's own
    class list (ignored for COCO, whose categories are authoritative)."""
    format = _check_format(format, "format")
    if format == "coco":
        return read_coco_dataset(src, skip_bad)
    if format == "yolo":
        return read_yolo(src, class_names, skip_bad)
    if format == "voc":
        return read_voc(src, class_names, skip_bad)
    return read_kitti(src, class_names, skip_bad)


def _image_copier(link: bool) -> Callable[[Path, Path], None]:
    def copy(src: Path, dst: Path) -> None:
        if dst.exists() and dst.resolve() == src.resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                if dst.exists():
                    dst.unlink()
                os.link(src, dst)
                return
            except OSError:
                pass  # another file system: fall back to copying
        shutil.copyfile(src, dst)

    return copy


def _losses(contents: DatasetContents, dst_format: str) -> list[str]:
    holds = _HOLDS[dst_format]
    records = contents.records
    lost = []
    n_objects = sum(len(r.boxes) for r in records)
    for name, (dtype, default, shape) in OBJECT_ATTRIBUTES.items():
        mode = holds.get(name)
        if mode == "exact" or n_objects == 0:
            continue
        present = [r for r in records if name in r.attributes]
        if not present:
            continue
        if name == "area":
            differs = sum(int((np.abs(r.attributes["area"] - box_area(r.boxes))
                               > 1e-3 * np.maximum(box_area(r.boxes), 1.0)).sum()) for r in present)
            if differs:
                lost.append(f"area: {differs} objects have an area other than their box area (e.g. a segmentation "
                            f"area); {dst_format} stores none, so reading back gives box areas")
            continue
        values = np.concatenate([r.attributes[name].reshape(len(r.boxes), -1) for r in present])
        defaults = np.broadcast_to(np.asarray(default, dtype=dtype), (len(values), *shape)).reshape(len(values), -1)
        if mode == "binary":
            count = int((~np.isin(values, (0, 1))).any(axis=1).sum())
            what = f"{name}: {count} objects have values other than 0/1; {dst_format} keeps only truncated or not"
        else:
            count = int((values != defaults).any(axis=1).sum())
            if name in ("iscrowd", "difficult"):
                what = (f"{name}: {count} objects flagged {name} are written as ordinary objects ({dst_format} has "
                        f"no {name} flag)")
            else:
                what = f"{name}: {count} objects carry a {name} that {dst_format} cannot store"
        if count:
            lost.append(what)
    lost += _segmentation_losses(records, dst_format)
    if "ignore_boxes" not in holds:
        regions = sum(len(r.ignore_boxes) for r in records)
        if regions:
            lost.append(f"ignore regions: {regions} regions (e.g. KITTI DontCare) are not written; {dst_format} has "
                        "no ignore regions")
    if "category_ids" not in holds and list(contents.category_ids) != list(range(1, len(contents.class_names) + 1)):
        lost.append(f"category ids {list(contents.category_ids)} become 1..{len(contents.class_names)} "
                    f"({dst_format} numbers classes by position)")
    if "image_ids" not in holds:
        recovered = image_ids_from_names([r.file_name for r in records])
        actual = np.array([r.image_id for r in records], np.int64)
        changed = int((recovered != actual).sum())
        if changed:
            lost.append(f"image ids: {dst_format} stores none; {changed} images will read back with other ids "
                        "(taken from their file names or their order)")
    return lost


def _segmentation_losses(records, dst_format: str) -> list[str]:
    """What happens to instance segmentations in ``dst_format`` (COCO holds them exactly)."""
    segmentations = [seg for r in records if r.segmentations is not None for seg in r.segmentations]
    if dst_format == "coco" or not segmentations:
        return []
    if dst_format != "yolo":
        return [f"segmentations: {sum(s is not None for s in segmentations)} objects' instance masks are not written "
                f"({dst_format} stores boxes only)"]
    lost = []
    multi = sum(isinstance(s, list) and len(s) > 1 for s in segmentations)
    if multi:
        lost.append(f"segmentations: {multi} multi-part polygons are joined into one outline (YOLO holds one polygon "
                    "per object; parts that overlap each other may lose their overlap)")
    rle = sum(isinstance(s, dict) for s in segmentations)
    if rle:
        lost.append(f"segmentations: {rle} RLE masks are written as polygons tracing their pixel boundary (the same "
                    "pixels; they read back as polygons, not RLE)")
    boxes_only = sum(s is None for s in segmentations)
    if boxes_only:
        lost.append(f"segmentations: {boxes_only} objects without a segmentation are written as their box's outline")
    return lost


def _resolve_name_clashes(contents: DatasetContents) -> list[str]:
    """Distinct images with the same file name (e.g. ``train/1.jpg`` and ``val/1.jpg`` from YOLO) would overwrite each
    other in one image folder: prefix such names with their split. Duplicate image ids are renumbered."""
    notes = []
    names = [r.file_name for r in contents.records]
    if len(set(names)) != len(names):
        split_of = {}
        for split, indices in contents.splits.items():
            for i in indices.tolist():
                split_of.setdefault(i, split)
        for i, record in enumerate(contents.records):
            record.file_name = f"{split_of.get(i, 'extra')}/{record.file_name}"
        notes.append("file names repeat across splits: every image is written under a '<split>/' sub-folder")
    ids = [r.image_id for r in contents.records]
    if len(set(ids)) != len(ids):
        for new_id, record in enumerate(contents.records, start=1):
            record.image_id = new_id
        notes.append("image ids repeat across splits: images renumbered 1..N")
    return notes


def _write(contents: DatasetContents, src: str | Path, src_format: str, dst: str | Path, dst_format: str,
           link_images: bool) -> ConversionReport:
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"dst must be a folder, got the file {dst}")
    report = ConversionReport(Path(src), src_format, dst, dst_format, skipped=contents.skipped)
    report.notes += _resolve_name_clashes(contents)
    report.lost = _losses(contents, dst_format)
    writer = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc, "kitti": write_kitti}[dst_format]
    dst.mkdir(parents=True, exist_ok=True)
    report.notes += writer(contents, dst, _image_copier(link_images))
    report.num_images = len(contents.records)
    report.num_objects = sum(len(r.boxes) for r in contents.records)
    report.num_ignore_regions = sum(len(r.ignore_boxes) for r in contents.records)
    report.splits = {name: len(indices) for name, indices in contents.splits.items()}
    return report


def convert_dataset(src: str | Path, src_format: str, dst: str | Path, dst_format: str, *, skip_bad: bool = False,
                    class_names: Sequence[str] | None = None, link_images: bool = False) -> ConversionReport:
    """Convert the dataset at ``src`` (format ``src_format``) to ``dst`` (format ``dst_format``), keeping its splits.

    Args:
        src: the source dataset: COCO: a folder with ``annotations/*.json`` and ``images/``, or one instances JSON;
            YOLO: the folder with ``data.yaml``; VOC: the folder with ``Annotations/`` and ``JPEGImages/``; KITTI:
            the folder with ``image_2/`` and ``label_2/``.
        src_format, dst_format: one of ``"coco"``, ``"yolo"``, ``"voc"``, ``"kitti"``.
        dst: output folder (created; files of the same names are overwritten).
        skip_bad: leave out images with a problem instead of raising (they are listed in ``report.skipped``).
        class_names: the source's classes in label order, where its format has no class list of its own.
        link_images: hard-link images instead of copying them (copies when linking is impossible).

    Returns:
        A :class:`ConversionReport`; ``report.lost`` says what ``dst_format`` could not hold.
    """
    src_format = _check_format(src_format, "src_format")
    dst_format = _check_format(dst_format, "dst_format")
    contents = read_dataset(src, src_format, skip_bad, class_names)
    if not contents.records:
        raise ValueError(f"src {src}: no images to convert" + (f" ({contents.skipped.summary()})"
                                                               if contents.skipped.count else ""))
    return _write(contents, src, src_format, dst, dst_format, link_images)


def split_dataset(src: str | Path, dst: str | Path, format: str = "coco", dst_format: str | None = None, *,
                  ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0, skip_bad: bool = False,
                  class_names: Sequence[str] | None = None, link_images: bool = False) -> ConversionReport:
    """Pool every image of the dataset at ``src`` and write it to ``dst`` with a new train/val/test split.

    Args:
        src: the source dataset (see :func:`convert_dataset`); its existing splits are ignored.
        dst: output folder.
        format: the source format; ``dst_format`` defaults to the same.
        ratios: train/val/test proportions (normalised; default 8:1:1). Sizes follow
            :func:`fastdet.data.split.split_counts`; a split that gets no image is not written.
        seed: the same source, ratios and seed always give the same split.
        skip_bad, class_names, link_images: as for :func:`convert_dataset`.
    """
    format = _check_format(format, "format")
    dst_format = _check_format(dst_format or format, "dst_format")
    check_ratios(ratios)
    contents = read_dataset(src, format, skip_bad, class_names)
    if not contents.records:
        raise ValueError(f"src {src}: no images to split")
    # Order by file name first, so the split depends on the images, not on the order the source listed them in.
    order = sorted(range(len(contents.records)), key=lambda i: (contents.records[i].file_name,
                                                                contents.records[i].image_id))
    contents.records = [contents.records[i] for i in order]
    contents.image_paths = [contents.image_paths[i] for i in order]
    parts = split_indices(len(contents.records), ratios, seed)
    contents.splits = {name: part for name, part in zip(DEFAULT_SPLIT_NAMES, parts) if len(part)}
    report = _write(contents, src, format, dst, dst_format, link_images)
    empty = [name for name, part in zip(DEFAULT_SPLIT_NAMES, parts) if not len(part)]
    if empty:
        report.notes.append(f"splits {empty} received no images and were not written")
    return report


__all__ = ["FORMATS", "ConversionReport", "convert_dataset", "split_dataset", "read_dataset"]
