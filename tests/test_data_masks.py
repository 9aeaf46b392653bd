"""Instance masks in the data pipeline: the synthetic shapes' masks, COCO polygons / RLE / crowd RLE read (checked
against pycocotools' own decoding) and written back, and the box-aware transforms keeping masks aligned with boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdet.data import CocoDetection, make_shapes_dataset, render_shapes_image
from fastdet.data import transforms as T
from fastdet.data._base import DatasetError
from fastdet.data.coco import read_coco, to_coco_dict, write_coco_json
from fastdet.data.masks import decode_segmentation, encode_mask

mask_api = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_images=8, image_size=(64, 96), seed=5, masks=True, split=(1, 0, 0))


def test_shapes_masks_are_the_visible_pixels_inside_tight_boxes(shapes):
    dataset = CocoDetection(shapes["images"], shapes["train"])
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), 64, 96)
        assert int(masks.sum(0).max()) <= 1, "instance masks of one image never overlap"
        for mask, box in zip(masks, target["boxes"]):
            assert tight_box(mask) == box.tolist()
    # the same rendering as render_shapes_image(return_masks=True), and boxes/images unchanged by masks=True
    image_id = dataset.records[0].image_id
    image, boxes, labels, masks = render_shapes_image(image_id - 1, seed=5, image_size=(64, 96), return_masks=True)
    assert np.array_equal(masks.astype(np.uint8), dataset[0][1]["masks"].numpy())
    image2, boxes2, labels2 = render_shapes_image(image_id - 1, seed=5, image_size=(64, 96))
    assert np.array_equal(image, image2) and np.array_equal(boxes, boxes2) and np.array_equal(labels, labels2)


def test_box_only_shapes_have_no_masks(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_images=3, image_size=(48, 48), seed=1, split=(1, 0, 0))
    assert "masks" not in CocoDetection(paths["images"], paths["train"])[0][1]


def _coco_with_segmentations(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    crowd = np.zeros((40, 50), np.uint8)
    crowd[5:20, 30:45] = 1
    # uncompressed RLE (column-major runs), as COCO stores crowd annotations
    flat = crowd.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    compressed = np.zeros((40, 50), np.uint8)
    compressed[25:38, 2:12] = 1
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 15, 12], "iscrowd": 0, "area": 100,
             "segmentation": [[10, 10, 25, 10, 25, 22, 10, 22], [11, 30, 14, 30, 14, 33]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 5, 15, 15], "iscrowd": 1, "area": 225,
             "segmentation": {"size": [40, 50], "counts": runs}},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 25, 10, 13], "iscrowd": 0, "area": 130,
             "segmentation": encode_mask(compressed)},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [40, 30, 5, 5], "iscrowd": 0, "area": 25},
        ],
    }
    path = write_coco_json(tmp_path / "instances.json", data)
    return path, data


def test_coco_polygons_rle_and_crowd_rle_decode_as_pycocotools(tmp_path):
    path, data = _coco_with_segmentations(tmp_path)
    dataset = CocoDetection(tmp_path / "images", path)
    _, target = dataset[0]
    coco = COCO(str(path))
    for i, ann in enumerate(coco.loadAnns(coco.getAnnIds())):
        if "segmentation" in ann:
            assert np.array_equal(target["masks"][i].numpy(), coco.annToMask(ann)), f"annotation {ann['id']}"
    # no segmentation: the box, filled
    assert tight_box(target["masks"][3]) == [40.0, 30.0, 45.0, 35.0] and int(target["masks"][3].sum()) == 25
    assert target["iscrowd"].tolist() == [0, 1, 0, 0]


def test_coco_segmentations_survive_a_write_read_round_trip(tmp_path):
    path, _ = _coco_with_segmentations(tmp_path)
    records, names, ids, _ = read_coco(path, tmp_path / "images")
    again = write_coco_json(tmp_path / "again.json", to_coco_dict(records, [{"id": 1, "name": "thing"}]))
    assert json.loads(again.read_text())["annotations"][0]["segmentation"] == records[0].segmentations[0]
    first = CocoDetection(tmp_path / "images", path)[0][1]["masks"]
    second = CocoDetection(tmp_path / "images", again)[0][1]["masks"]
    assert torch.equal(first, second)


@pytest.mark.parametrize("segmentation, match", [
    ({"size": [40], "counts": "abc"}, "RLE 'size'"),
    ({"size": [40, 50], "counts": [1, 2]}, "add up to"),
    ([[1, 2, 3]], "polygons"),
    ("nope", "segmentation must be"),
])
def test_malformed_segmentations_are_reported(tmp_path, segmentation, match):
    path, data = _coco_with_segmentations(tmp_path)
    data["annotations"][0]["segmentation"] = segmentation
    write_coco_json(path, data)
    with pytest.raises(DatasetError, match=match):
        read_coco(path, tmp_path / "images")


def test_decode_rejects_an_rle_of_another_size():
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation(encode_mask(np.ones((4, 5), np.uint8)), 5, 5)


@pytest.mark.parametrize("transform", [
    T.RandomHorizontalFlip(1.0),
    T.Resize((128, 192)),  # exactly twice the size: nearest-neighbour masks scale exactly
    T.RandomIoUCrop(min_ious=[0.0], generator=torch.Generator().manual_seed(3)),
    T.RandomAffine(translate=(0.2, 0.2), generator=torch.Generator().manual_seed(4)),
], ids=["flip", "resize", "crop", "affine-translate"])
def test_transforms_keep_masks_aligned_with_boxes(shapes, transform):
    dataset = CocoDetection(shapes["images"], shapes["train"])
    checked = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        out_image, out = transform(image, target)
        masks = out["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(out["boxes"]), *out_image.shape[-2:])
        for mask, box in zip(masks, out["boxes"]):
            if isinstance(transform, T.RandomIoUCrop):
                # a cut object keeps its clipped box; its mask is what the crop left of it, inside that box
                x1, y1, x2, y2 = tight_box(mask)
                assert box[0] <= x1 and box[1] <= y1 and x2 <= box[2] and y2 <= box[3]
            elif isinstance(transform, T.RandomAffine):
                # a fractional shift: nearest sampling moves an edge by at most one pixel; an object shifted partly
                # out of the image keeps its clipped box and what is left of its mask
                x1, y1, x2, y2 = tight_box(mask)
                assert box[0] - 1 <= x1 and box[1] - 1 <= y1 and x2 <= box[2] + 1 and y2 <= box[3] + 1
                inside = 0 < box[0] and 0 < box[1] and box[2] < out_image.shape[-1] and box[3] < out_image.shape[-2]
                if inside:
                    torch.testing.assert_close(torch.tensor([x1, y1, x2, y2]), box, atol=1.0, rtol=0)
            else:
                assert tight_box(mask) == box.tolist()
            checked += 1
    assert checked > 5


def _random_masks(seed: int):
    rng = np.random.default_rng(seed)
    masks = [rng.random((int(rng.integers(1, 24)), int(rng.integers(1, 24)))) < rng.random() for _ in range(60)]
    ring = np.ones((9, 9), bool)
    ring[3:6, 3:6] = False  # a hole
    pinch = np.zeros((4, 4), bool)
    pinch[0:2, 0:2] = pinch[2:4, 2:4] = True  # two squares touching at a corner
    return masks + [ring, pinch, np.ones((1, 1), bool), np.ones((5, 7), bool)]


def test_mask_to_polygon_rasterises_back_to_the_same_mask(shapes, seed):
    from fastdet.data.masks import mask_to_polygon

    masks = [m for i in range(6) for m in render_shapes_image(i, seed=seed % 1000, image_size=(64, 96),
                                                              return_masks=True)[3]]
    for mask in masks + _random_masks(seed):
        polygon = mask_to_polygon(mask)
        height, width = mask.shape
        if not mask.any():
            assert polygon == []
            continue
        back = mask_api.decode(mask_api.frPyObjects([polygon], height, width))[:, :, 0]
        assert np.array_equal(back, mask.astype(np.uint8)), f"seed={seed}"
    assert mask_to_polygon(np.zeros((3, 4), bool)) == []


def test_join_polygons_covers_every_part():
    from fastdet.data.masks import join_polygons

    parts = [[2, 2, 8, 2, 8, 6, 2, 6], [20, 10, 26, 10, 23, 18], [5, 20, 9, 20, 9, 24, 5, 24]]
    joined = join_polygons(parts)
    assert len(joined) % 2 == 0 and len(joined) >= 6 * 3
    one = mask_api.decode(mask_api.frPyObjects([joined], 30, 30))[:, :, 0]
    separate = mask_api.decode(mask_api.merge(mask_api.frPyObjects(parts, 30, 30)))
    assert np.array_equal(one, separate)
    assert join_polygons([]) == [] and join_polygons([parts[0]]) == [float(v) for v in parts[0]]


def test_yolo_segmentation_labels_round_trip_the_masks(shapes, tmp_path):
    from fastdet.data import convert_dataset, read_dataset

    report = convert_dataset(shapes["root"], "coco", tmp_path / "yolo", "yolo")
    assert any("RLE masks are written as polygons" in item for item in report.lost)
    lines = [line.split() for path in sorted((tmp_path / "yolo" / "labels").rglob("*.txt"))
             for line in path.read_text().splitlines()]
    assert lines and all(len(fields) >= 7 and len(fields) % 2 == 1 for fields in lines)  # class + polygon pairs
    original = {r.image_id: r for r in read_dataset(shapes["root"], "coco").records}
    again = read_dataset(tmp_path / "yolo", "yolo").records
    assert len(again) == len(original)
    for record in again:
        source = original[record.image_id]
        assert record.segmentations is not None and all(len(s) == 1 for s in record.segmentations)
        np.testing.assert_allclose(record.boxes, source.boxes, atol=1e-3)
        masks = [decode_segmentation(s, record.height, record.width) for s in record.segmentations]
        expected = [decode_segmentation(s, source.height, source.width) for s in source.segmentations]
        assert all(np.array_equal(m, e) for m, e in zip(masks, expected))
    # and back to COCO: polygons now, the same pixels
    convert_dataset(tmp_path / "yolo", "yolo", tmp_path / "coco", "coco")
    dataset = read_dataset(tmp_path / "coco", "coco")
    for record in dataset.records:
        source = original[record.image_id]
        for s, e in zip(record.segmentations, source.segmentations):
            assert isinstance(s, list)
            assert np.array_equal(decode_segmentation(s, record.height, record.width),
                                  decode_segmentation(e, source.height, source.width))


def test_yolo_reports_what_its_polygons_cannot_hold(tmp_path):
    from fastdet.data import convert_dataset, read_dataset

    path, _ = _coco_with_segmentations(tmp_path)
    (tmp_path / "annotations").mkdir()
    path.rename(tmp_path / "annotations" / "instances_train.json")
    report = convert_dataset(tmp_path, "coco", tmp_path / "yolo", "yolo")
    lost = "\n".join(report.lost)
    assert "1 multi-part polygons are joined" in lost and "2 RLE masks" in lost and "1 objects without" in lost
    record = read_dataset(tmp_path / "yolo", "yolo").records[0]
    # the object without a segmentation comes back as its box's outline: the same filled box
    box_mask = decode_segmentation(record.segmentations[3], record.height, record.width)
    assert box_mask.sum() == 25 and box_mask[30:35, 40:45].all()
    voc = convert_dataset(tmp_path, "coco", tmp_path / "voc", "voc")
    assert any("3 objects' instance masks are not written" in item for item in voc.lost)


def test_yolo_polygon_labels_must_be_finite(tmp_path):
    from PIL import Image

    from fastdet.data import read_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "1.png")
    (tmp_path / "labels" / "1.txt").write_text("0 0.1 0.1 0.5 nan 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    with pytest.raises(DatasetError, match="finite"):
        read_dataset(tmp_path, "yolo")
