"""What every dataset format shares: the in-memory record of one image, the error and skip reporting, image decoding,
box validation and the ``torch.utils.data.Dataset`` base class that turns records into ``(image, target)`` pairs.

Conventions used throughout ``fastdet.data``:

* Boxes are ``x1, y1, x2, y2`` in pixels, float32, with the pixel grid's edges at integers: a pixel with column ``c``
  covers ``[c, c + 1)``, so a box that tightly holds columns ``c0..c1`` has ``x1 = c0`` and ``x2 = c1 + 1``. This is
  COCO's convention (``bbox = [x, y, w, h]`` with ``x2 = x + w``).
* Labels are contiguous ``1..K`` for the model; ``0`` is background. Each dataset keeps the mapping back to its own
  category ids (``label_to_category_id`` / ``category_id_to_label``) and its class names (``class_names[label - 1]``).
* Per-object attributes that some formats carry (``iscrowd``, ``difficult``, ``truncated``, ``occluded`` and KITTI's 3-D
  fields) travel next to the boxes in ``ImageRecord.attributes`` and in the target, so converters can keep them.
* Regions whose detections must be neither rewarded nor punished (KITTI ``DontCare``) are ``ignore_boxes``: boxes
  without a label.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# A box may reach this many pixels past the image border before it counts as "outside the image": annotation tools
# routinely store x2 = width + 0.5 or -0.3 from sub-pixel rounding. Within the tolerance the box is clipped to the image
# (a change of at most one pixel); beyond it the box is reported as bad.
OUT_OF_IMAGE_TOLERANCE = 1.0

# Per-object attributes understood by every reader and writer: name -> (dtype, value used where a format lacks it,
# trailing shape). A record holds only the attributes its source provides; a target always holds "iscrowd" and "area".
OBJECT_ATTRIBUTES: dict[str, tuple[Any, Any, tuple[int, ...]]] = {
    "area": (np.float32, None, ()),  # None: the box area
    "iscrowd": (np.int64, 0, ()),
    "difficult": (np.bool_, False, ()),
    "truncated": (np.float32, 0.0, ()),
    # KITTI's occlusion state: 0 fully visible, 1 partly, 2 largely occluded, 3 unknown.
    "occluded": (np.int64, 3, ()),
    # KITTI's 3-D fields; the defaults are the values KITTI itself writes for objects without 3-D annotation.
    "alpha": (np.float32, -10.0, ()),
    "dimensions": (np.float32, (-1.0, -1.0, -1.0), (3,)),  # height, width, length in metres
    "location": (np.float32, (-1000.0, -1000.0, -1000.0), (3,)),  # x, y, z in camera coordinates
    "rotation_y": (np.float32, -10.0, ()),
}


class DatasetError(ValueError):
    """A problem with a dataset file. ``str(error)`` reads ``"<path>:<line>: <problem>"``; ``kind`` is a short
    machine-readable category ("missing_image", "corrupt_image", "malformed_label", "bad_box", ...)."""

    def __init__(self, kind: str, problem: str, path: str | Path | None = None, line: int | None = None):
        self.kind = kind
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.line = line
        location = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(f"{location}{problem}")

    def __reduce__(self):  # DataLoader workers pickle exceptions back to the main process
        return (type(self), (self.kind, self.problem, self.path, self.line))


@dataclasses.dataclass
class SkipReport:
    """What ``skip_bad=True`` left out: one :class:`DatasetError` per skipped sample (or dropped stray annotation)."""

    problems: list[DatasetError] = dataclasses.field(default_factory=list)
    total: int = 0  # samples examined

    @property
    def count(self) -> int:
        return len(self.problems)

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(problem.kind for problem in self.problems))

    def summary(self) -> str:
        if not self.problems:
            return f"no samples skipped (of {self.total})"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.by_kind().items()))
        first = "; ".join(str(p) for p in self.problems[:3])
        more = f"; ... {self.count - 3} more" if self.count > 3 else ""
        return f"skipped {self.count} of {self.total} samples ({kinds}): {first}{more}"

    def __str__(self) -> str:
        return self.summary()


class ProblemCollector:
    """Raises the first problem, or (``skip_bad=True``) records it so the reader can leave the sample out."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = bool(skip_bad)
        self.report = SkipReport()

    def __call__(self, error: DatasetError) -> None:
        if not self.skip_bad:
            raise error
        self.report.problems.append(error)

    def finish(self, dataset_name: str, source: str | Path, total: int) -> SkipReport:
        self.report.total = int(total)
        if self.report.problems:
            warnings.warn(f"{dataset_name} ({source}): {self.report.summary()}; the full list is in `.skipped`",
                          stacklevel=3)
        return self.report


@dataclasses.dataclass
class ImageRecord:
    """One image and its objects, in the common in-memory form every reader produces and every writer consumes."""

    file_name: str  # path relative to the image root, '/'-separated
    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4], x1 y1 x2 y2 pixels
    labels: np.ndarray  # int64 [N], contiguous 1..K
    attributes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> [N, ...]
    ignore_boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
    # One COCO segmentation per object (polygons, RLE or None; see fastdet.data.masks), or None for box-only data.
    segmentations: list | None = None

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.ignore_boxes = np.asarray(self.ignore_boxes, dtype=np.float32).reshape(-1, 4)
        if self.labels.shape[0] != self.boxes.shape[0]:
            raise ValueError(f"{self.file_name}: {self.boxes.shape[0]} boxes but {self.labels.shape[0]} labels")
        if self.segmentations is not None and len(self.segmentations) != self.boxes.shape[0]:
            raise ValueError(f"{self.file_name}: {len(self.segmentations)} segmentations for {self.boxes.shape[0]} "
                             f"boxes")
        for name, values in self.attributes.items():
            if len(values) != self.boxes.shape[0]:
                raise ValueError(f"{self.file_name}: attribute {name!r} has {len(values)} values for "
                                 f"{self.boxes.shape[0]} boxes")

    @property
    def stem(self) -> str:
        return str(Path(self.file_name).with_suffix("")).replace("\\", "/")

    def attribute(self, name: str) -> np.ndarray:
        """The attribute's values, or the format-neutral default (box area for "area") when the source lacks it."""
        if name in self.attributes:
            return self.attributes[name]
        dtype, default, shape = OBJECT_ATTRIBUTES[name]
        if name == "area":
            return box_area(self.boxes)
        return np.broadcast_to(np.asarray(default, dtype=dtype), (len(self.boxes), *shape)).copy()


def box_area(boxes: np.ndarray) -> np.ndarray:
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)


def check_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate pixel boxes against an image of ``width x height``.

    Returns ``(clipped_boxes, bad_mask, reasons)``: boxes within :data:`OUT_OF_IMAGE_TOLERANCE` of the image are clipped
    to it; ``bad_mask[i]`` marks a non-finite box, a degenerate one (``x2 <= x1`` or ``y2 <= y1`` after clipping) or
    one reaching further outside the image than the tolerance; ``reasons[i]`` describes it ("" for good boxes).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    tol = OUT_OF_IMAGE_TOLERANCE
    with np.errstate(invalid="ignore"):
        outside = ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > width + tol)
                   | (boxes[:, 3] > height + tol))
        clipped = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
        degenerate = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    bad = ~finite | outside | degenerate
    reasons = []
    for i in range(len(boxes)):  # only builds messages; the checks above are vectorised
        if not bad[i]:
            reasons.append("")
            continue
        box = ", ".join(f"{v:g}" for v in boxes[i].tolist())
        if not finite[i]:
            reasons.append(f"box [{box}] has a non-finite coordinate")
        elif outside[i]:
            reasons.append(f"box [{box}] (x1, y1, x2, y2) lies outside the {width}x{height} image")
        else:
            reasons.append(f"box [{box}] (x1, y1, x2, y2) is degenerate (zero or negative width or height)")
    return clipped, bad, reasons


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header (no decoding). Raises :class:`DatasetError` for a missing or
    unreadable file."""
    if not path.is_file():
        raise DatasetError("missing_image", "image file not found", path)
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError("corrupt_image", f"cannot read image: {exc}", path) from None


def load_image(path: Path, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file to ``Tensor[3, H, W]`` float32 in ``[0, 1]`` (greyscale, palette and alpha images become
    RGB). ``expected_size`` is ``(width, height)`` from the annotation; a mismatch is an error because the boxes would
    no longer fit the pixels."""
    if not path.is_file():
        raise DatasetError("missing_image", "image file not found", path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError("corrupt_image", f"cannot decode image: {exc}", path) from None
    if expected_size is not None and rgb.size != tuple(expected_size):
        raise DatasetError("size_mismatch", f"image is {rgb.size[0]}x{rgb.size[1]} but its annotation says "
                           f"{expected_size[0]}x{expected_size[1]} (width x height)", path)
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def find_image(directory: Path, stem: str) -> Path | None:
    """The image file ``directory/stem.<ext>`` for any known image extension (either case), or None."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (directory / f"{stem}{ext}", directory / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted by relative path."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(directory).as_posix())


def record_to_target(record: ImageRecord) -> dict[str, Any]:
    """The model-facing target of one record: tensors plus the ``image_id``."""
    target: dict[str, Any] = {
        "boxes": torch.from_numpy(record.boxes.copy()),
        "labels": torch.from_numpy(record.labels.copy()),
        "image_id": int(record.image_id),
        "area": torch.from_numpy(np.ascontiguousarray(record.attribute("area"), dtype=np.float32)),
        "iscrowd": torch.from_numpy(np.ascontiguousarray(record.attribute("iscrowd"), dtype=np.int64)),
    }
    for name, values in record.attributes.items():
        if name not in target:
            target[name] = torch.from_numpy(np.ascontiguousarray(values))
    target["ignore_boxes"] = torch.from_numpy(record.ignore_boxes.copy())
    target["orig_size"] = torch.tensor([record.height, record.width], dtype=torch.int64)
    if record.segmentations is not None:
        from fastdet.data.masks import decode_segmentations

        target["masks"] = torch.from_numpy(decode_segmentations(record.segmentations, record.height, record.width,
                                                                record.boxes))
    return target


class DetectionDataset(torch.utils.data.Dataset):
    """Base of every format's dataset: a list of :class:`ImageRecord` plus the class list.

    ``dataset[i]`` is ``(image, target)``: ``image`` is ``Tensor[3, H, W]`` float32 in ``[0, 1]``; ``target`` holds
    ``boxes`` (``Tensor[N, 4]`` float32, x1 y1 x2 y2 pixels), ``labels`` (``Tensor[N]`` int64, 1..K), ``image_id``
    (int), ``area`` (``Tensor[N]``), ``iscrowd`` (``Tensor[N]`` int64), any further per-object attributes of the format
    (``difficult``, ``truncated``, ...), ``ignore_boxes`` (``Tensor[M, 4]``) and ``orig_size`` (``Tensor[2]``: H, W);
    with instance segmentations (COCO polygons/RLE), ``masks`` (``Tensor[N, H, W]`` uint8, one per box).
    ``transforms(image, target)`` is applied last.

    Attributes: ``records``, ``image_root``, ``class_names`` (label ``k`` is ``class_names[k - 1]``), ``categories``
    (COCO-style ``[{"id", "name"}]`` in label order), ``label_to_category_id``, ``category_id_to_label`` and
    ``skipped`` (a :class:`SkipReport`).
    """

    format_name = "detection"

    def __init__(self, records: Sequence[ImageRecord], image_root: str | Path, class_names: Sequence[str],
                 category_ids: Sequence[int] | None = None, transforms: Callable | None = None,
                 skipped: SkipReport | None = None, source: str | Path | None = None,
                 image_paths: Sequence[str | Path] | None = None):
        self.records = list(records)
        self.image_root = Path(image_root)
        # Formats with one folder per split (YOLO) keep each record's own file; otherwise image_root / file_name.
        self._image_paths = None if image_paths is None else [Path(p) for p in image_paths]
        if self._image_paths is not None and len(self._image_paths) != len(self.records):
            raise ValueError(f"{len(self._image_paths)} image paths for {len(self.records)} records")
        self.class_names = tuple(str(name) for name in class_names)
        if category_ids is None:
            category_ids = range(1, len(self.class_names) + 1)
        category_ids = [int(c) for c in category_ids]
        if len(category_ids) != len(self.class_names):
            raise ValueError(f"{len(category_ids)} category ids for {len(self.class_names)} class names")
        self.label_to_category_id = {label: cid for label, cid in enumerate(category_ids, start=1)}
        self.category_id_to_label = {cid: label for label, cid in self.label_to_category_id.items()}
        self.categories = [{"id": cid, "name": name} for cid, name in zip(category_ids, self.class_names)]
        if transforms is not None and not callable(transforms):
            raise TypeError(f"transforms must be callable (image, target) -> (image, target), got {type(transforms)}")
        self.transforms = transforms
        self.skipped = skipped if skipped is not None else SkipReport(total=len(self.records))
        self.source = source
        if not self.records:
            raise DatasetError("empty_dataset", "the dataset has no images" + (
                f" ({self.skipped.summary()})" if self.skipped.count else ""), source)

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (labels run 1..K; a model with a background class needs K + 1)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        if self._image_paths is not None:
            return self._image_paths[index]
        return self.image_root / self.records[index].file_name

    def get_target(self, index: int) -> dict[str, Any]:
        """The untransformed target of sample ``index`` without decoding its image."""
        return record_to_target(self.records[index])

    def __getitem__(self, index: int):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        record = self.records[index]
        image = load_image(self.image_path(index), (record.width, record.height))
        target = record_to_target(record)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def to_coco(self, ignore_regions_as_crowd: bool = False) -> dict:
        """The ground truth as a COCO-format dict (see :func:`fastdet.data.coco.to_coco_dict`)."""
        from fastdet.data.coco import to_coco_dict

        return to_coco_dict(self, ignore_regions_as_crowd=ignore_regions_as_crowd)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, root={str(self.image_root)!r}"
                + (f", skipped={self.skipped.count}" if self.skipped.count else "") + ")")


@dataclasses.dataclass
class DatasetContents:
    """A whole dataset on disk, all splits: what converters read and write."""

    records: list[ImageRecord]
    image_paths: list[Path]  # the source file of each record
    class_names: list[str]
    category_ids: list[int]
    splits: dict[str, np.ndarray]  # split name -> indices into records ("all" when the source has no splits)
    skipped: SkipReport
    source: Path

    def select(self, split: str | None) -> tuple[list[ImageRecord], list[Path]]:
        """Records and image paths of one split (None: every record)."""
        if split is None:
            return list(self.records), list(self.image_paths)
        if split not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)} for {self.source}, got {split!r}")
        indices = self.splits[split].tolist()
        return [self.records[i] for i in indices], [self.image_paths[i] for i in indices]


def image_ids_from_names(file_names: Sequence[str]) -> np.ndarray:
    """Image ids for formats that store none: the file stems as integers when every stem is a distinct decimal number
    (KITTI's ``000123.png``, the synthetic set's ``000001.png``: converting keeps COCO ids), else ``1..N`` in order."""
    stems = [Path(name).stem for name in file_names]
    if stems and all(stem.isdigit() for stem in stems):
        ids = np.array([int(stem) for stem in stems], np.int64)
        if len(np.unique(ids)) == len(ids):
            return ids
    return np.arange(1, len(file_names) + 1, dtype=np.int64)


def read_label_text(path: Path) -> str:
    """The text of a per-image label file (YOLO, KITTI), or a DatasetError saying it is missing or unreadable."""
    if not path.is_file():
        raise DatasetError("missing_label", "label file not found", path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError("malformed_label", f"cannot read label file: {exc}", path) from None


def read_class_list(path: Path) -> list[str] | None:
    """``classes.txt``: one class name per line, in label order (blank lines ignored); None if absent."""
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise DatasetError("malformed_label", "class names must be distinct", path)
    return names


def check_class_names(class_names: Sequence[str] | None, where: str) -> list[str]:
    if class_names is None:
        raise ValueError(f"{where}: no class list found; pass class_names=[...]")
    if isinstance(class_names, str) or not all(isinstance(n, str) and n for n in class_names):
        raise TypeError(f"class_names must be a sequence of non-empty str, got {class_names!r}")
    names = list(class_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be non-empty and distinct, got {names}")
    return names
