"""COCO / YOLO / VOC / KITTI datasets, round trips through every converter, COCO ground truth, seeded splits."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdet.data import (
    FORMATS,
    CocoDetection,
    KittiDetection,
    VocDetection,
    YoloDetection,
    convert_dataset,
    make_shapes_dataset,
    read_dataset,
    split_counts,
    split_dataset,
    split_indices,
    to_coco_dict,
    write_coco_json,
)

DATASET_CLASSES = {"coco": CocoDetection, "yolo": YoloDetection, "voc": VocDetection, "kitti": KittiDetection}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_images=10, image_size=(48, 64), shapes=3, seed=5)


def _make_rich_coco(root):
    """A COCO set with everything the formats disagree on: gapped category ids, crowd, difficult, KITTI fields,
    ignore regions, a segmentation area and fractional coordinates."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id, (w, h) in ((7, (64, 48)), (9, (50, 40))):
        name = f"{image_id:06d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    images[1]["ignore_regions"] = [[30, 2, 10, 8]]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1.5, 2.25, 20, 10], "area": 150.0, "iscrowd": 0,
         "truncated": 0.3, "occluded": 1, "alpha": -1.5, "dimensions": [1.5, 1.6, 3.9], "location": [1, 2, 30],
         "rotation_y": -1.2},
        {"id": 2, "image_id": 7, "category_id": 10, "bbox": [30, 5, 30, 40], "area": 1200.0, "iscrowd": 1},
        {"id": 3, "image_id": 9, "category_id": 10, "bbox": [0, 0, 12, 12], "area": 144.0, "iscrowd": 0,
         "difficult": True},
    ]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 10, "name": "Pedestrian"}, {"id": 3, "name": "Car"}]}
    write_coco_json(root / "annotations" / "instances_train.json", coco)
    return root


def _records_by_id(contents):
    return {r.image_id: r for r in contents.records}


def _split_ids(contents):
    return {name: sorted(contents.records[i].image_id for i in indices.tolist())
            for name, indices in contents.splits.items()}


def _assert_same_boxes(a, b, tol=1e-3):
    ra, rb = _records_by_id(a), _records_by_id(b)
    assert ra.keys() == rb.keys()
    for image_id in ra:
        x, y = ra[image_id], rb[image_id]
        assert (x.width, x.height, x.file_name) == (y.width, y.height, y.file_name)
        np.testing.assert_allclose(x.boxes, y.boxes, atol=tol)
        assert [a.class_names[i - 1] for i in x.labels] == [b.class_names[i - 1] for i in y.labels]


def test_coco_dataset_sample_layout(shapes):
    dataset = CocoDetection(shapes["images"], shapes["train"])
    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["boxes"].shape[1] == 4 and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and int(target["labels"].min()) >= 1
    assert isinstance(target["image_id"], int)
    assert target["orig_size"].tolist() == [48, 64]
    coco = json.loads(shapes["train"].read_text())
    first = coco["images"][0]
    anns = [a for a in coco["annotations"] if a["image_id"] == first["id"]]
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    assert target["boxes"].tolist() == expected
    # Reading does not decode images: get_target matches the sample's target
    assert torch.equal(dataset.get_target(0)["boxes"], target["boxes"])


def test_coco_category_mapping_and_flags(tmp_path):
    root = _make_rich_coco(tmp_path / "rich")
    dataset = CocoDetection(root / "images", root / "annotations" / "instances_train.json")
    # Contiguous labels in increasing category-id order: id 3 -> label 1, id 10 -> label 2.
    assert dataset.class_names == ("Car", "Pedestrian")
    assert dataset.label_to_category_id == {1: 3, 2: 10}
    assert dataset.category_id_to_label == {3: 1, 10: 2}
    assert dataset.categories == [{"id": 3, "name": "Car"}, {"id": 10, "name": "Pedestrian"}]
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["area"].tolist() == [150.0, 1200.0]
    assert target["boxes"][0].tolist() == pytest.approx([1.5, 2.25, 21.5, 12.25])
    _, target = dataset[1]
    assert target["difficult"].tolist() == [True]
    assert target["ignore_boxes"].tolist() == [[30, 2, 40, 10]]
    # The COCO ground truth maps labels back to the dataset's category ids and loads in pycocotools.
    gt = dataset.to_coco()
    assert sorted(a["category_id"] for a in gt["annotations"]) == [3, 10, 10]
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = gt
    api.createIndex()
    assert sorted(api.getImgIds()) == [7, 9]
    crowd = to_coco_dict(dataset, ignore_regions_as_crowd=True)
    regions = [a for a in crowd["annotations"] if a.get("ignore_region")]
    assert len(regions) == 2 and all(a["iscrowd"] == 1 for a in regions)  # one per category


@pytest.mark.parametrize("dst_format", FORMATS)
def test_each_format_reads_back_what_it_wrote(shapes, tmp_path, dst_format):
    source = read_dataset(shapes["root"], "coco")
    report = convert_dataset(shapes["root"], "coco", tmp_path / dst_format, dst_format)
    assert report.lossless, str(report)
    assert report.num_images == 10 and report.splits == {"train": 8, "val": 1, "test": 1}
    back = read_dataset(tmp_path / dst_format, dst_format)
    _assert_same_boxes(source, back)
    assert _split_ids(back) == _split_ids(source)
    dataset = DATASET_CLASSES[dst_format](*(((tmp_path / "coco" / "images",
                                              tmp_path / "coco" / "annotations" / "instances_val.json"))
                                            if dst_format == "coco" else (tmp_path / dst_format, "val")))
    assert len(dataset) == 1 and dataset.class_names == ("rectangle", "ellipse", "triangle")
    image, target = dataset[0]
    assert image.shape == (3, 48, 64)


@pytest.mark.parametrize("src_format,dst_format", list(itertools.permutations(FORMATS, 2)))
def test_round_trip_through_every_converter(shapes, tmp_path, src_format, dst_format):
    first = tmp_path / "first"
    convert_dataset(shapes["root"], "coco", first, src_format)
    convert_dataset(first, src_format, tmp_path / "second", dst_format)
    convert_dataset(tmp_path / "second", dst_format, tmp_path / "third", "coco")
    _assert_same_boxes(read_dataset(shapes["root"], "coco"), read_dataset(tmp_path / "third", "coco"))


def test_coco_holds_everything_and_reports_what_others_cannot(tmp_path):
    root = _make_rich_coco(tmp_path / "rich")
    original = read_dataset(root, "coco")
    report = convert_dataset(root, "coco", tmp_path / "coco", "coco")
    assert report.lossless, str(report)
    again = read_dataset(tmp_path / "coco", "coco")
    for a, b in zip(original.records, again.records):
        assert a.attributes.keys() == b.attributes.keys() or set(b.attributes) <= set(a.attributes)
        for name in a.attributes:
            np.testing.assert_allclose(a.attribute(name), b.attribute(name), rtol=1e-6)
        np.testing.assert_allclose(a.ignore_boxes, b.ignore_boxes)

    yolo = convert_dataset(root, "coco", tmp_path / "yolo", "yolo")
    lost = "\n".join(yolo.lost)
    for word in ("iscrowd", "difficult", "truncated", "ignore regions", "category ids", "area"):
        assert word in lost, (word, lost)
    assert not yolo.lossless
    kitti = convert_dataset(root, "coco", tmp_path / "kitti", "kitti")
    lost = "\n".join(kitti.lost)
    assert "iscrowd" in lost and "difficult" in lost and "truncated" not in lost and "ignore" not in lost
    # KITTI keeps its own fields and DontCare regions exactly.
    back = read_dataset(tmp_path / "kitti", "kitti")
    by_id = _records_by_id(back)
    np.testing.assert_allclose(by_id[7].attributes["location"][0], [1, 2, 30])
    assert by_id[7].attributes["occluded"].tolist() == [1, 3]
    np.testing.assert_allclose(by_id[9].ignore_boxes, [[30, 2, 40, 10]])
    assert back.class_names == ["Car", "Pedestrian"]
    voc = convert_dataset(root, "coco", tmp_path / "voc", "voc")
    assert "difficult" not in "\n".join(voc.lost) and "truncated" in "\n".join(voc.lost)
    assert _records_by_id(read_dataset(tmp_path / "voc", "voc"))[9].attributes["difficult"].tolist() == [True]


def test_voc_pixel_convention(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>20</width><height>10</height></size>"
        "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax>"
        "<ymax>10</ymax></bndbox></object></annotation>")
    dataset = VocDetection(root)
    target = dataset.get_target(0)
    assert target["boxes"].tolist() == [[0, 0, 20, 10]]  # the whole image, 1-based inclusive -> pixel edges
    assert target["difficult"].tolist() == [True]
    assert dataset.class_names == ("dog",)


def test_yolo_layout_and_names_dict(tmp_path):
    root = tmp_path / "y"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(root / "images" / "train" / "x.jpg")
    (root / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.3 0.1 0.3 0.3\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames:\n  0: cat\n  1: dog\n")
    dataset = YoloDetection(root, split="train")
    target = dataset.get_target(0)
    assert dataset.class_names == ("cat", "dog")
    assert target["labels"].tolist() == [2, 1]
    np.testing.assert_allclose(target["boxes"].numpy(), [[40, 15, 60, 35], [10, 5, 30, 15]], atol=1e-4)


def test_split_is_seeded_and_partitions(shapes, tmp_path):
    assert split_counts(10) == [8, 1, 1]
    assert split_counts(7, (0.5, 0.5, 0)) == [4, 3, 0]
    assert sum(split_counts(1001, (0.7, 0.2, 0.1))) == 1001
    a = split_indices(50, seed=3)
    b = split_indices(50, seed=3)
    c = split_indices(50, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(50))

    r1 = split_dataset(shapes["root"], tmp_path / "s1", "coco", "yolo", ratios=(0.6, 0.2, 0.2), seed=1)
    r2 = split_dataset(shapes["root"], tmp_path / "s2", "coco", "yolo", ratios=(0.6, 0.2, 0.2), seed=1)
    assert r1.splits == {"train": 6, "val": 2, "test": 2}
    s1, s2 = read_dataset(tmp_path / "s1", "yolo"), read_dataset(tmp_path / "s2", "yolo")
    names = {k: sorted(s1.records[i].file_name for i in v) for k, v in s1.splits.items()}
    assert names == {k: sorted(s2.records[i].file_name for i in v) for k, v in s2.splits.items()}
    assert sorted(sum(names.values(), [])) == sorted(r.file_name for r in read_dataset(shapes["root"], "coco").records)
    with pytest.raises(ValueError, match="ratios"):
        split_dataset(shapes["root"], tmp_path / "s3", ratios=(1, 1))
    with pytest.raises(ValueError, match="format"):
        split_dataset(shapes["root"], tmp_path / "s3", format="pascal")
