"""Pascal VOC XML.

Layout: ``root/Annotations/<id>.xml``, ``root/JPEGImages/<file>``, optional ``root/ImageSets/Main/<split>.txt`` (one id
per line) and optional ``root/classes.txt`` (one class name per line, in label order; fastdet writes it, VOC itself
has none). Without ``class_names`` or ``classes.txt`` the classes are the sorted names found in the annotations.

Coordinates: VOC's ``xmin ymin xmax ymax`` count pixels from 1 and include both ends, so a box covering pixel columns
``c0..c1`` (0-based) is written ``xmin = c0 + 1, xmax = c1 + 1``. In fastdet's pixel-edge convention that box is
``x1 = c0, x2 = c1 + 1``; hence ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (detectron2's reading too).

``difficult`` is kept as the per-object flag ``target["difficult"]`` (VOC's evaluation ignores such objects) and
``truncated`` as ``target["truncated"]`` (0 or 1).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat
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
    read_class_list,
    read_image_size,
)


def _text(element: ET.Element | None) -> str | None:
    return None if element is None or element.text is None else element.text.strip()


def _parse_with_lines(path: Path) -> tuple[ET.Element, dict[int, int]]:
    """Parse with expat directly so each element's line number is known (ElementTree does not keep it)."""
    builder = ET.TreeBuilder()
    lines: dict[int, int] = {}
    parser = expat.ParserCreate()

    def start(tag, attrs):
        lines[id(builder.start(tag, attrs))] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
        root = builder.close()
    except expat.ExpatError as exc:
        raise DatasetError("malformed_label", f"invalid XML: {expat.ErrorString(exc.code)}", path, exc.lineno) \
            from None
    except AssertionError:  # TreeBuilder.close() on an empty document
        raise DatasetError("malformed_label", "invalid XML: no root element", path) from None
    return root, lines


def _parse_xml(path: Path):
    """``(filename, width, height, objects)``; objects are ``(name, [xmin, ymin, xmax, ymax], difficult, truncated,
    line)``. Raises DatasetError naming the file and line."""
    if not path.is_file():
        raise DatasetError("missing_label", "annotation file not found", path)
    root, lines = _parse_with_lines(path)
    if root.tag != "annotation":
        raise DatasetError("malformed_label", f"root element must be <annotation>, got <{root.tag}>", path)
    filename = _text(root.find("filename"))
    size = root.find("size")
    width = height = None
    if size is not None:
        try:
            width, height = int(float(_text(size.find("width")) or 0)), int(float(_text(size.find("height")) or 0))
        except ValueError:
            raise DatasetError("malformed_label", "<size> must hold numeric <width> and <height>", path) from None
    objects = []
    for obj in root.iter("object"):
        line = lines.get(id(obj))
        name = _text(obj.find("name"))
        box = obj.find("bndbox")
        if not name:
            raise DatasetError("malformed_label", "<object> without a <name>", path, line)
        if box is None:
            raise DatasetError("malformed_label", f"<object> {name!r} without a <bndbox>", path, line)
        try:
            coords = [float(_text(box.find(tag))) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise DatasetError("malformed_label", f"<bndbox> of {name!r} needs numeric xmin, ymin, xmax, ymax",
                               path, line) from None
        flags = []
        for tag in ("difficult", "truncated"):
            value = _text(obj.find(tag))
            try:
                flags.append(int(float(value)) if value not in (None, "") else 0)
            except ValueError:
                raise DatasetError("malformed_label", f"<{tag}> of {name!r} must be 0 or 1, got {value!r}", path,
                                   line) from None
        objects.append((name, coords, flags[0], flags[1], line))
    return filename, width, height, objects


def _list_ids(root: Path) -> dict[str, list[str]]:
    sets = root / "ImageSets" / "Main"
    splits = {}
    for name in ("train", "val", "test"):
        path = sets / f"{name}.txt"
        if path.is_file():
            splits[name] = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not splits:
        annotations = root / "Annotations"
        if not annotations.is_dir():
            raise DatasetError("missing_label", "no Annotations/ folder", root)
        splits["all"] = sorted(p.relative_to(annotations).with_suffix("").as_posix()
                               for p in annotations.rglob("*.xml"))
    return splits


def read_voc(root: str | Path, class_names: Sequence[str] | None = None, skip_bad: bool = False) -> DatasetContents:
    """Read a VOC dataset (all splits listed in ``ImageSets/Main``, else every XML in ``Annotations``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("missing_label", "dataset folder not found", root)
    split_ids = _list_ids(root)
    ordered_ids = list(dict.fromkeys(i for ids in split_ids.values() for i in ids))
    collect = ProblemCollector(skip_bad)
    parsed = {}
    for image_id in ordered_ids:
        try:
            parsed[image_id] = _parse_xml(root / "Annotations" / f"{image_id}.xml")
        except DatasetError as error:
            collect(error)
    if class_names is None:
        class_names = read_class_list(root / "classes.txt")
    if class_names is None:
        class_names = sorted({obj[0] for p in parsed.values() for obj in p[3]})
    names = check_class_names(class_names, f"{root} (VOC)")
    label_of = {name: label for label, name in enumerate(names, start=1)}
    file_names = []
    for image_id in ordered_ids:
        filename = parsed[image_id][0] if image_id in parsed else None
        sub = Path(image_id).parent
        file_names.append((sub / filename).as_posix() if filename else f"{image_id}.jpg")
    numeric_ids = image_ids_from_names(file_names)
    records, paths, index_of = [], [], {}
    for k, image_id in enumerate(ordered_ids):
        if image_id not in parsed:
            continue
        xml_path = root / "Annotations" / f"{image_id}.xml"
        filename, width, height, objects = parsed[image_id]
        try:
            image_path = root / "JPEGImages" / file_names[k] if filename else None
            if image_path is None or not image_path.is_file():
                image_path = find_image(root / "JPEGImages", image_id) or (root / "JPEGImages" / file_names[k])
            actual = read_image_size(image_path)
            if width and height and actual != (width, height):
                raise DatasetError("size_mismatch", f"<size> says {width}x{height} but the image "
                                   f"{image_path.name} is {actual[0]}x{actual[1]}", xml_path)
            width, height = actual
            unknown = [(obj[0], obj[4]) for obj in objects if obj[0] not in label_of]
            if unknown:
                raise DatasetError("unknown_class", f"class {unknown[0][0]!r} is not one of {names}", xml_path,
                                   unknown[0][1])
            coords = np.asarray([obj[1] for obj in objects], np.float32).reshape(-1, 4)
            boxes = coords - np.array([1, 1, 0, 0], np.float32)
            clipped, bad, reasons = check_boxes(boxes, width, height)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise DatasetError("bad_box", f"object {objects[j][0]!r}: {reasons[j]}", xml_path, objects[j][4])
        except DatasetError as error:
            collect(error)
            continue
        index_of[image_id] = len(records)
        records.append(ImageRecord(
            file_name=image_path.relative_to(root / "JPEGImages").as_posix(), image_id=int(numeric_ids[k]),
            width=width, height=height, boxes=clipped,
            labels=np.asarray([label_of[obj[0]] for obj in objects], np.int64),
            attributes={"difficult": np.asarray([obj[2] for obj in objects], bool),
                        "truncated": np.asarray([obj[3] for obj in objects], np.float32)}))
        paths.append(image_path)
    splits = {name: np.array([index_of[i] for i in ids if i in index_of], np.int64) for name, ids in split_ids.items()}
    report = collect.finish("VocDetection", root, len(ordered_ids))
    return DatasetContents(records, paths, names, list(range(1, len(names) + 1)), splits, report, root)


class VocDetection(DetectionDataset):
    """A Pascal VOC dataset (see the module docstring).

    Args:
        root: the folder holding ``Annotations/`` and ``JPEGImages/`` (e.g. ``VOCdevkit/VOC2012``).
        split: a name from ``ImageSets/Main`` (``train``, ``val``, ``test``) or None for every image.
        transforms: optional ``(image, target) -> (image, target)`` callable.
        skip_bad: leave out images with a problem instead of raising (see ``.skipped``).
        class_names: class names in label order; an object of another class is an error (default: ``classes.txt``,
            else the sorted names found in the annotations).
    """

    format_name = "voc"

    def __init__(self, root: str | Path, split: str | None = None, transforms: Callable | None = None,
                 skip_bad: bool = False, class_names: Sequence[str] | None = None):
        contents = read_voc(root, class_names, skip_bad)
        records, paths = contents.select(split)
        self.split = split
        super().__init__(records, Path(root) / "JPEGImages", contents.class_names, contents.category_ids, transforms,
                         contents.skipped, root, image_paths=paths)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.7g}"


def write_voc(contents: DatasetContents, dst: str | Path, copy_image: Callable[[Path, Path], None]) -> list[str]:
    """Write ``contents`` as VOC under ``dst`` (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``,
    ``classes.txt``). Returns notes on what VOC could not hold."""
    dst = Path(dst)
    (dst / "Annotations").mkdir(parents=True, exist_ok=True)
    (dst / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (dst / "classes.txt").write_text("".join(f"{n}\n" for n in contents.class_names), encoding="utf-8")
    notes: list[str] = []
    for i, record in enumerate(contents.records):
        copy_image(contents.image_paths[i], dst / "JPEGImages" / record.file_name)
        annotation = ET.Element("annotation")
        ET.SubElement(annotation, "folder").text = "JPEGImages"
        ET.SubElement(annotation, "filename").text = Path(record.file_name).name
        size = ET.SubElement(annotation, "size")
        ET.SubElement(size, "width").text = str(record.width)
        ET.SubElement(size, "height").text = str(record.height)
        ET.SubElement(size, "depth").text = "3"
        difficult = record.attribute("difficult").astype(int).tolist()
        truncated = (record.attribute("truncated") > 0).astype(int).tolist()
        vocbox = record.boxes.astype(np.float64) + np.array([1, 1, 0, 0])
        for label, box, diff, trunc in zip(record.labels.tolist(), vocbox.tolist(), difficult, truncated):
            obj = ET.SubElement(annotation, "object")
            ET.SubElement(obj, "name").text = contents.class_names[label - 1]
            ET.SubElement(obj, "truncated").text = str(trunc)
            ET.SubElement(obj, "difficult").text = str(diff)
            bndbox = ET.SubElement(obj, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bndbox, tag).text = _number(value)
        ET.indent(annotation)
        xml_path = dst / "Annotations" / f"{record.stem}.xml"
        xml_path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(annotation).write(xml_path, encoding="utf-8", xml_declaration=False)
    for split, indices in contents.splits.items():
        if split == "all":
            continue
        ids = [contents.records[i].stem for i in indices.tolist()]
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids), encoding="utf-8")
    return notes
