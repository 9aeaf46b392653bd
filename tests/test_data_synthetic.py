"""The synthetic shapes generator: valid COCO files, tight boxes, determinism by seed, placement rules."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from fastdet.data import CocoDetection, collate_detection, make_data_loader, make_shapes_dataset, render_shapes_image
from fastdet.data.synthetic import SHAPE_KINDS


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_writes_valid_coco_with_splits(tmp_path):
    paths = make_shapes_dataset(tmp_path / "shapes", num_images=20, image_size=(64, 96), shapes=4, seed=3)
    assert set(paths) == {"root", "images", "train", "val", "test"}
    ids, ann_ids = set(), set()
    sizes = {}
    for split, expected in (("train", 16), ("val", 2), ("test", 2)):
        coco = json.loads(paths[split].read_text())
        assert len(coco["images"]) == expected
        assert [c["name"] for c in coco["categories"]] == list(SHAPE_KINDS[:4])
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
        for image in coco["images"]:
            assert (image["width"], image["height"]) == (96, 64)
            assert image["id"] not in ids
            ids.add(image["id"])
            assert (paths["images"] / image["file_name"]).is_file()
        for ann in coco["annotations"]:
            assert ann["id"] not in ann_ids or split != "train"
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 64
            assert ann["area"] == pytest.approx(w * h)
            assert ann["iscrowd"] == 0
            sizes[split] = sizes.get(split, 0) + 1
        ann_ids.update(a["id"] for a in coco["annotations"])
    assert ids == set(range(1, 21))  # the splits partition the images


def test_pycocotools_reads_it(tmp_path):
    from pycocotools.coco import COCO

    paths = make_shapes_dataset(tmp_path, num_images=10, image_size=(64, 64), seed=1)
    coco = COCO(str(paths["train"]))
    assert len(coco.getImgIds()) == 8
    assert len(coco.getAnnIds()) >= 8


def test_deterministic_by_seed(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_images=6, image_size=(48, 48), seed=7)
    b = make_shapes_dataset(tmp_path / "b", num_images=6, image_size=(48, 48), seed=7)
    c = make_shapes_dataset(tmp_path / "c", num_images=6, image_size=(48, 48), seed=8)
    assert _digest(a["root"]) == _digest(b["root"])
    assert _digest(a["root"]) != _digest(c["root"])
    # Image i does not depend on how many images are generated.
    image_small, boxes_small, _ = render_shapes_image(3, seed=7, image_size=(48, 48))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a["images"] / "000004.png")), image_small)


def test_boxes_are_tight_and_objects_identifiable(seed):
    kinds = SHAPE_KINDS
    for index in range(8):
        image, boxes, labels = render_shapes_image(index, seed=seed, image_size=(96, 128), shapes=kinds,
                                                   min_objects=3, max_objects=6)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert len(boxes) == len(labels) >= 1
        assert labels.min() >= 1 and labels.max() <= len(kinds)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
        # Placement rule: no pair of visible boxes overlaps more than max_iou (visible boxes can only shrink, so the
        # visible-box IoU can exceed the placement IoU slightly; 0.3 + margin is the meaningful bound).
        from fastdet.ops.reference import box_iou

        iou = box_iou(torch.from_numpy(boxes).double(), torch.from_numpy(boxes).double())
        iou.fill_diagonal_(0)
        assert iou.max() <= 0.5, (index, iou.max())


def test_tight_box_matches_drawn_pixels():
    # A single object on a solid background: its box equals the extent of the pixels that differ.
    for index in range(40):
        image, boxes, labels = render_shapes_image(index, seed=11, image_size=(64, 64), min_objects=1,
                                                   max_objects=1)
        corner = image[0, 0]
        differs = (image != corner).any(axis=2)
        rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
        if rows.size and (image[:, :] == corner).all(axis=2).sum() > 0.5 * 64 * 64 and \
                np.unique(image.reshape(-1, 3), axis=0).shape[0] == 2:  # solid background, no noise
            assert boxes.tolist() == [[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]]
            return
    pytest.fail("no solid-background image among the first 40")


def test_dataset_and_loader_with_workers(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_images=10, image_size=(64, 64), seed=0)
    dataset = CocoDetection(paths["images"], paths["train"])
    assert dataset.class_names == ("rectangle", "ellipse", "triangle")
    assert dataset.label_to_category_id == {1: 1, 2: 2, 3: 3}
    loader = make_data_loader(dataset, batch_size=3, shuffle=True, num_workers=2, seed=0)
    seen = []
    for images, targets in loader:
        assert len(images) == len(targets) <= 3
        for image, target in zip(images, targets):
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            seen.append(target["image_id"])
    assert sorted(seen) == sorted(r.image_id for r in dataset.records)
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert len(images) == 2 and targets[1]["image_id"] == dataset.records[1].image_id


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shapes"):
        make_shapes_dataset(tmp_path, num_images=2, shapes=["rectangle", "blob"])
    with pytest.raises(ValueError, match="num_images"):
        make_shapes_dataset(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path, num_images=2, image_size=(8, 8))
    with pytest.raises(ValueError, match="min_objects"):
        make_shapes_dataset(tmp_path, num_images=2, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="ratios"):
        make_shapes_dataset(tmp_path, num_images=2, split=(1, -1, 0))
