"""Bad input: each problem raises DatasetError naming the file (and line), and skip_bad=True leaves the sample out and
reports it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fastdet.data import (
    CocoDetection,
    DatasetError,
    KittiDetection,
    VocDetection,
    YoloDetection,
    convert_dataset,
    make_shapes_dataset,
    write_coco_json,
)


def _coco(tmp_path, annotations, images=None, categories=None, n_images=2):
    (tmp_path / "images").mkdir(exist_ok=True)
    if images is None:
        images = []
        for i in range(1, n_images + 1):
            Image.new("RGB", (32, 24), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 24})
    coco = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return write_coco_json(tmp_path / "ann.json", coco)


def _ann(i, image_id, bbox, category_id=1):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0, "iscrowd": 0}


@pytest.mark.parametrize("bbox,kind,words", [
    ([1, 1, 0, 5], "bad_box", "degenerate"),
    ([20, 1, 30, 5], "bad_box", "outside"),
    ([1, 1, float("nan"), 5], "bad_box", "non-finite"),
    ([1, 1, 5], "malformed_label", "bbox"),
])
def test_coco_bad_boxes(tmp_path, bbox, kind, words):
    path = _coco(tmp_path, [_ann(1, 1, [1, 1, 4, 4]), _ann(2, 2, bbox)])
    with pytest.raises(DatasetError, match=words) as info:
        CocoDetection(tmp_path / "images", path)
    assert info.value.kind == kind and "ann.json" in str(info.value) and "2.png" in str(info.value) or \
        info.value.kind == kind
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        dataset = CocoDetection(tmp_path / "images", path, skip_bad=True)
    assert len(dataset) == 1 and dataset.skipped.count == 1 and dataset.skipped.by_kind() == {kind: 1}


def test_coco_box_within_tolerance_is_clipped(tmp_path):
    path = _coco(tmp_path, [_ann(1, 1, [-0.5, 0, 33.2, 24.5])])
    assert CocoDetection(tmp_path / "images", path).get_target(0)["boxes"].tolist() == [[0, 0, 32, 24]]


def test_coco_inconsistent_ids_and_unknown_category(tmp_path):
    path = _coco(tmp_path, [_ann(1, 1, [1, 1, 4, 4]), _ann(1, 2, [1, 1, 4, 4])])
    with pytest.raises(DatasetError, match="annotation id 1") as info:
        CocoDetection(tmp_path / "images", path)
    assert info.value.kind == "inconsistent_ids"
    path = _coco(tmp_path, [_ann(1, 5, [1, 1, 4, 4])])
    with pytest.raises(DatasetError, match="image_id 5"):
        CocoDetection(tmp_path / "images", path)
    path = _coco(tmp_path, [_ann(1, 1, [1, 1, 4, 4], category_id=9)])
    with pytest.raises(DatasetError, match="category_id 9"):
        CocoDetection(tmp_path / "images", path)
    images = [{"id": 1, "file_name": "1.png", "width": 32, "height": 24},
              {"id": 1, "file_name": "2.png", "width": 32, "height": 24}]
    path = _coco(tmp_path, [], images=images)
    with pytest.raises(DatasetError, match="image id 1 appears more than once"):
        CocoDetection(tmp_path / "images", path)
    path = _coco(tmp_path, [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(DatasetError, match="category id 1"):
        CocoDetection(tmp_path / "images", path)


def test_coco_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n "images": [],\n "annotations": [}\n')
    with pytest.raises(DatasetError, match=r"bad.json:3: invalid JSON"):
        CocoDetection(tmp_path, path)
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "missing.json")


def test_missing_and_corrupt_images(tmp_path):
    path = _coco(tmp_path, [_ann(1, 1, [1, 1, 4, 4]), _ann(2, 2, [1, 1, 4, 4])], n_images=3)
    (tmp_path / "images" / "2.png").unlink()
    (tmp_path / "images" / "3.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="2.png: image file not found"):
        CocoDetection(tmp_path / "images", path)
    # A corrupt file is caught when it is decoded (or when the index is verified).
    with pytest.warns(UserWarning):
        dataset = CocoDetection(tmp_path / "images", path, skip_bad=True)
    assert len(dataset) == 1 and dataset.skipped.by_kind() == {"missing_image": 1, "corrupt_image": 1}
    assert "skipped 2 of 3" in dataset.skipped.summary()
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24} for i in (1, 3)]
    lazy = CocoDetection(tmp_path / "images", _coco(tmp_path, [], images=images))
    with pytest.raises(DatasetError, match="3.png: cannot decode image"):
        lazy[1]
    # Size disagreeing with the JSON
    images = [{"id": 1, "file_name": "1.png", "width": 30, "height": 24}]
    with pytest.raises(DatasetError, match="image is 32x24"):
        CocoDetection(tmp_path / "images", _coco(tmp_path, [], images=images), verify_images=True)


def test_empty_dataset(tmp_path):
    path = _coco(tmp_path, [], images=[])
    with pytest.raises(DatasetError, match="no images"):
        CocoDetection(tmp_path / "images", path)
    (tmp_path / "kitti" / "image_2").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        KittiDetection(tmp_path / "kitti")


def _yolo(tmp_path, label_text, names="[a, b]"):
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (40, 20)).save(root / "images" / "ok.png")
    (root / "labels" / "ok.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    Image.new("RGB", (40, 20)).save(root / "images" / "bad.png")
    if label_text is not None:
        (root / "labels" / "bad.txt").write_text(label_text)
    (root / "data.yaml").write_text(f"names: {names}\n")
    return root


@pytest.mark.parametrize("text,kind,pattern", [
    ("0 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.5\n", "malformed_label", r"bad.txt:2: expected 'class cx cy w h'"),
    ("0 0.5 0.5 0.5 0.5\nx 0.5 0.5 0.5 0.5\n", "malformed_label", r"bad.txt:2: fields must be"),
    ("\n5 0.5 0.5 0.5 0.5\n", "unknown_class", r"bad.txt:2: class 5 is not in 0..1"),
    ("0 1.5 0.5 0.5 0.5\n", "bad_box", r"bad.txt:1: box .* outside"),
    ("0 0.5 0.5 0 0.5\n", "bad_box", r"bad.txt:1: box .* degenerate"),
    (None, "missing_label", r"bad.txt: label file not found"),
])
def test_yolo_bad_labels(tmp_path, text, kind, pattern):
    root = _yolo(tmp_path, text)
    with pytest.raises(DatasetError, match=pattern) as info:
        YoloDetection(root)
    assert info.value.kind == kind
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        dataset = YoloDetection(root, skip_bad=True)
    assert len(dataset) == 1 and dataset.skipped.problems[0].kind == kind
    if text is None:
        assert len(YoloDetection(root, allow_missing_labels=True)) == 2


def test_yolo_malformed_yaml(tmp_path):
    root = _yolo(tmp_path, "")
    (root / "data.yaml").write_text("names: [a, b\n")
    with pytest.raises(DatasetError, match="data.yaml.*invalid YAML"):
        YoloDetection(root)
    (root / "data.yaml").write_text("nc: 3\nnames: [a, b]\n")
    with pytest.raises(DatasetError, match="nc is 3"):
        YoloDetection(root)


def test_voc_errors_name_file_and_line(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "a.jpg")
    xml = ("<annotation>\n<filename>a.jpg</filename>\n<object>\n<name>{name}</name>\n<bndbox><xmin>1</xmin><ymin>1</ymin>"
           "<xmax>{xmax}</xmax><ymax>5</ymax></bndbox>\n</object>\n</annotation>\n")
    (root / "Annotations" / "a.xml").write_text(xml.format(name="cat", xmax=30))
    with pytest.raises(DatasetError, match=r"a.xml:3: object 'cat': box .* outside"):
        VocDetection(root)
    (root / "Annotations" / "a.xml").write_text(xml.format(name="horse", xmax=5))
    with pytest.raises(DatasetError, match=r"a.xml:3: class 'horse' is not one of \['cat'\]"):
        VocDetection(root, class_names=["cat"])
    (root / "Annotations" / "a.xml").write_text("<annotation>\n<object>\n</annotation>\n")
    with pytest.raises(DatasetError, match=r"a.xml:3: invalid XML"):
        VocDetection(root)
    (root / "Annotations" / "b.xml").write_text(xml.format(name="cat", xmax=5).replace("a.jpg", "b.jpg"))
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "b.jpg")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        dataset = VocDetection(root, skip_bad=True)
    assert len(dataset) == 1 and dataset.skipped.by_kind() == {"malformed_label": 1}
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no images .*skipped 2 of 2"):
        VocDetection(root, skip_bad=True)


def test_kitti_errors_and_dontcare(tmp_path):
    root = tmp_path / "kitti"
    (root / "image_2").mkdir(parents=True)
    (root / "label_2").mkdir()
    Image.new("RGB", (100, 50)).save(root / "image_2" / "000001.png")
    good = "Car 0.00 0 -1.5 10.00 5.00 40.00 30.00 1.5 1.6 3.9 1.0 2.0 30.0 -1.2\n"
    dontcare = "DontCare -1 -1 -10 50.00 10.00 60.00 20.00 -1 -1 -1 -1000 -1000 -1000 -10\n"
    (root / "label_2" / "000001.txt").write_text(good + dontcare)
    dataset = KittiDetection(root)
    target = dataset.get_target(0)
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [1] and target["ignore_boxes"].tolist() == [[50, 10, 60, 20]]
    assert target["location"].tolist() == [[1.0, 2.0, 30.0]]
    (root / "label_2" / "000001.txt").write_text(good + "Spaceship 0 0 0 1 1 5 5 1 1 1 1 1 1 1\n")
    with pytest.raises(DatasetError, match=r"000001.txt:2: type 'Spaceship'"):
        KittiDetection(root)
    (root / "label_2" / "000001.txt").write_text("Car 0 0 0 1 1 5\n")
    with pytest.raises(DatasetError, match=r"000001.txt:1: expected 15 fields"):
        KittiDetection(root)
    (root / "label_2" / "000001.txt").unlink()
    with pytest.raises(DatasetError, match="000001.txt: label file not found"):
        KittiDetection(root)


def test_converter_does_not_drop_silently(tmp_path):
    paths = make_shapes_dataset(tmp_path / "s", num_images=4, image_size=(40, 40), split=(1, 0, 0))
    coco = json.loads(paths["train"].read_text())
    coco["annotations"][0]["bbox"] = [0, 0, 0, 5]
    paths["train"].write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="degenerate"):
        convert_dataset(paths["root"], "coco", tmp_path / "out", "yolo")
    with pytest.warns(UserWarning):
        report = convert_dataset(paths["root"], "coco", tmp_path / "out", "yolo", skip_bad=True)
    assert report.num_images == 3 and report.skipped.count == 1 and not report.lossless
    assert "skipped 1 of 4" in str(report)
    with pytest.raises(ValueError, match="src_format"):
        convert_dataset(paths["root"], "json", tmp_path / "out", "yolo")
