"""Box-aware transforms: geometry against independent computations, the clip/drop rule, no in-place changes."""

from __future__ import annotations

import copy

import pytest
import torch

from fastdet.data import (
    AttachProposals,
    CocoDetection,
    ColorJitter,
    Compose,
    Normalize,
    RandomAffine,
    RandomHorizontalFlip,
    RandomIoUCrop,
    Resize,
    make_data_loader,
    make_shapes_dataset,
)
from fastdet.data.transforms import moved_regions, update_boxes


def _sample(generator=None, h=40, w=60):
    image = torch.rand(3, h, w, generator=generator)
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 20.0, 60.0, 40.0], [5.0, 25.0, 15.0, 35.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([100.0, 600.0, 50.0]),
        "iscrowd": torch.tensor([0, 1, 0]),
        "difficult": torch.tensor([False, False, True]),
        "image_id": 4,
        "orig_size": torch.tensor([h, w]),
        "ignore_boxes": torch.tensor([[40.0, 0.0, 50.0, 10.0]]),
    }
    return image, target


def _box_image(h, w, boxes):
    """An image whose pixels are 1 exactly inside each box (integer boxes)."""
    image = torch.zeros(3, h, w)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        image[:, y1:y2, x1:x2] = 1.0
    return image


ALL = [Resize((20, 30)), Resize(30, max_size=50), RandomHorizontalFlip(1.0), RandomIoUCrop(min_ious=[0.0]),
       ColorJitter(0.4, 0.4, 0.4, 0.1), RandomAffine(15, (0.1, 0.1), (0.8, 1.2), 5), Normalize()]


@pytest.mark.parametrize("transform", ALL, ids=repr)
def test_inputs_untouched_and_fields_consistent(transform, seed):
    torch.manual_seed(seed)
    image, target = _sample()
    image_before, target_before = image.clone(), copy.deepcopy(target)
    out_image, out_target = transform(image, target)
    assert torch.equal(image, image_before)
    for key, value in target_before.items():
        assert torch.equal(target[key], value) if isinstance(value, torch.Tensor) else target[key] == value
    assert out_image.dim() == 3 and out_image.shape[0] == 3 and out_image.dtype == torch.float32
    n = out_target["boxes"].shape[0]
    for key in ("labels", "area", "iscrowd", "difficult"):
        assert out_target[key].shape[0] == n
    h, w = out_image.shape[-2:]
    boxes = out_target["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    assert out_target["image_id"] == 4
    # The surviving objects keep their own labels and flags (rows move together).
    label_of = dict(zip(target["labels"].tolist(), zip(target["iscrowd"].tolist(), target["difficult"].tolist())))
    for label, crowd, difficult in zip(out_target["labels"].tolist(), out_target["iscrowd"].tolist(),
                                       out_target["difficult"].tolist()):
        assert label_of[label] == (crowd, difficult)
    # Image-only transforms keep the target as it was.
    if isinstance(transform, (ColorJitter, Normalize)):
        assert torch.equal(out_target["boxes"], target["boxes"])


def test_resize_scales_boxes_with_pixels():
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0], [20.0, 8.0, 40.0, 20.0]])
    image = _box_image(20, 40, boxes)
    out, target = Resize((40, 80))(image, {"boxes": boxes, "labels": torch.tensor([1, 2]),
                                           "area": torch.tensor([64.0, 240.0])})
    assert target["boxes"].tolist() == (boxes * 2).tolist()
    assert target["area"].tolist() == [256.0, 960.0]
    for x1, y1, x2, y2 in target["boxes"].long().tolist():
        assert out[0, y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 0.99  # inside stays inside
    assert Resize(30, max_size=50).output_size(20, 40) == (25, 50)
    assert Resize(30).output_size(20, 40) == (30, 60)


def test_flip_matches_pixels():
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0]])
    image = _box_image(20, 40, boxes)
    out, target = RandomHorizontalFlip(1.0)(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert torch.equal(out, _box_image(20, 40, target["boxes"]))
    assert target["boxes"].tolist() == [[28.0, 2.0, 36.0, 10.0]]
    same, target = RandomHorizontalFlip(0.0)(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert torch.equal(same, image) and torch.equal(target["boxes"], boxes)


def test_affine_translation_matches_pixels():
    boxes = torch.tensor([[10.0, 10.0, 20.0, 16.0]])
    image = _box_image(32, 48, boxes)
    affine = RandomAffine(translate=(0.25, 0.25))
    forward = torch.tensor([[1.0, 0, 6], [0, 1, -4], [0, 0, 1]], dtype=torch.float64)
    affine.sample_matrix = lambda h, w: forward  # a fixed draw: shift by (+6, -4) pixels
    out, target = affine(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert target["boxes"].tolist() == [[16.0, 6.0, 26.0, 12.0]]
    assert torch.allclose(out, _box_image(32, 48, target["boxes"]), atol=1e-5)


def test_drop_rule():
    target = {"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 3]), "area": torch.tensor([1.0, 1.0, 1.0])}
    moved = torch.tensor([[-8.0, 0.0, 2.0, 10.0],  # 20% left inside: dropped
                          [-5.0, 0.0, 5.0, 10.0],  # 50% left: kept, clipped
                          [3.0, 3.0, 3.5, 8.0]])  # narrower than min_size: dropped
    out = update_boxes(target, moved, 20, 20)
    assert out["boxes"].tolist() == [[0.0, 0.0, 5.0, 10.0]]
    assert out["labels"].tolist() == [2]


def test_proposals_move_with_the_image_and_are_not_per_object():
    """Precomputed proposals (attached by AttachProposals) follow every geometric transform like ignore regions:
    moved, clipped, dropped only when nothing is left, and never filtered with the objects, even when there are
    as many proposals as objects."""
    proposals = torch.tensor([[2.0, 4.0, 12.0, 20.0], [50.0, 0.0, 70.0, 10.0], [100.0, 100.0, 120.0, 130.0]])
    image, target = _sample()
    image, target = AttachProposals({4: proposals, 5: torch.zeros(0, 4)})(image, target)
    # clipped to the 60 x 40 image; the third lies wholly outside
    assert target["proposals"].tolist() == [[2.0, 4.0, 12.0, 20.0], [50.0, 0.0, 60.0, 10.0]]
    assert "proposals" not in _sample()[1]
    _, flipped = RandomHorizontalFlip(1.0)(image, target)
    assert flipped["proposals"].tolist() == [[48.0, 4.0, 58.0, 20.0], [0.0, 0.0, 10.0, 10.0]]
    _, resized = Resize((20, 30))(image, target)
    assert resized["proposals"].tolist() == [[1.0, 2.0, 6.0, 10.0], [25.0, 0.0, 30.0, 5.0]]
    # as many proposals as objects: dropping objects must not drop proposals (nor the reverse)
    target["proposals"] = torch.cat([target["proposals"], torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    moved = torch.tensor([[-8.0, 0.0, 2.0, 10.0], [-5.0, 0.0, 5.0, 10.0], [3.0, 3.0, 3.5, 8.0]])
    out = update_boxes(target, moved, 20, 20, regions=moved_regions(target, lambda b: b + 1.0))
    assert out["labels"].tolist() == [2]
    assert out["proposals"].tolist() == [[3.0, 5.0, 13.0, 20.0], [1.0, 1.0, 2.0, 2.0]]
    with pytest.raises(KeyError, match="no proposals for image_id 4"):
        AttachProposals({5: proposals})(image, _sample()[1])


def test_iou_crop_keeps_objects(seed):
    g = torch.Generator().manual_seed(seed)
    crop = RandomIoUCrop(min_ious=[0.3], generator=g)
    for _ in range(20):
        image, target = _sample(g)
        out, new = crop(image, target)
        assert new["boxes"].shape[0] >= 1
        h, w = out.shape[-2:]
        assert h <= 40 and w <= 60


def test_color_jitter_range_and_normalize():
    image, target = _sample(torch.Generator().manual_seed(0))
    out, _ = ColorJitter(0.5, 0.5, 0.5, 0.2)(image, target)
    assert 0 <= out.min() and out.max() <= 1 and not torch.equal(out, image)
    out, _ = Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image, target)
    assert torch.allclose(out, image * 2 - 1)
    with pytest.raises(ValueError, match="std"):
        Normalize(std=(0, 1, 1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        Resize(0)
    with pytest.raises(ValueError, match="p must"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="min_scale"):
        RandomIoUCrop(min_scale=0)
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="scale"):
        RandomAffine(scale=(1.2, 0.8))
    with pytest.raises(TypeError, match="image"):
        Resize(10)(torch.zeros(10, 10), None)
    with pytest.raises(ValueError, match="boxes"):
        Resize(10)(torch.zeros(3, 10, 10), {"boxes": torch.zeros(4)})
    with pytest.raises(TypeError, match="callable"):
        Compose([Resize(10), "flip"])


def test_pipeline_in_a_loader_with_workers(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_images=8, image_size=(48, 48), seed=2, split=(1, 0, 0))
    pipeline = Compose([RandomIoUCrop(), RandomHorizontalFlip(), ColorJitter(), Resize((32, 32)), Normalize()])
    dataset = CocoDetection(paths["images"], paths["train"], transforms=pipeline)

    def run():
        batches = list(make_data_loader(dataset, batch_size=3, shuffle=True, num_workers=2, seed=9))
        return [(t["image_id"], t["boxes"].tolist()) for _, targets in batches for t in targets]

    first, second = run(), run()
    assert first == second  # seeded loader: same order and same random transforms
    assert sorted(i for i, _ in first) == list(range(1, 9))
