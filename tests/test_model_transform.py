"""DetectionTransform against torchvision's GeneralizedRCNNTransform: images, targets, padding and the inverse box
mapping, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastdet.models.transform import DetectionTransform, ImageBatch, batched_postprocess_boxes, resize_boxes

tv_transform = pytest.importorskip("torchvision.models.detection.transform")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CONFIGS = [
    dict(min_size=160, max_size=320),
    dict(min_size=200, max_size=250, size_divisible=16),  # max_size binds for elongated images
    dict(min_size=(96, 128, 160), max_size=256),  # multi-scale training
    dict(min_size=160, max_size=320, fixed_size=(300, 200)),  # SSD-style
    dict(min_size=64, max_size=1000, size_divisible=1),
]


def _images_and_targets(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sizes = [(97, 203), (333, 150), (64, 64), (128, 129)]
    images = [torch.rand(3, h, w, generator=g, dtype=dtype) for h, w in sizes]
    targets = []
    for h, w in sizes:
        n = int(torch.randint(0, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 1
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(dtype),
                        "labels": torch.randint(1, 9, (n,), generator=g), "extra": torch.arange(n)})
    return images, targets


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_matches_torchvision(config, training, seed):
    ours = DetectionTransform(image_mean=MEAN, image_std=STD, **config).train(training)
    theirs = tv_transform.GeneralizedRCNNTransform(image_mean=MEAN, image_std=STD, **config).train(training)
    images, targets = _images_and_targets(seed)
    torch.manual_seed(seed)  # multi-scale training draws from torch's RNG: same seed, same draws
    batch, our_targets = ours(images, targets)
    torch.manual_seed(seed)
    ref, their_targets = theirs(images, targets)
    assert isinstance(batch, ImageBatch)
    assert batch.image_sizes == ref.image_sizes, f"seed={seed}"
    assert torch.equal(batch.tensors, ref.tensors), f"seed={seed}"
    for ours_t, theirs_t in zip(our_targets, their_targets):
        assert torch.equal(ours_t["boxes"], theirs_t["boxes"]), f"seed={seed}"
        assert torch.equal(ours_t["labels"], theirs_t["labels"])
        assert ours_t["extra"] is theirs_t["extra"]  # other keys pass through untouched


def test_padding_is_a_multiple_of_size_divisible():
    t = DetectionTransform(100, 1000, MEAN, STD, size_divisible=32).eval()
    batch, _ = t([torch.rand(3, 100, 130), torch.rand(3, 150, 100)])
    assert batch.tensors.shape[-2] % 32 == 0 and batch.tensors.shape[-1] % 32 == 0
    # padding is zero after normalisation (as torchvision: pad the normalised image)
    h, w = batch.image_sizes[0]
    assert torch.all(batch.tensors[0, :, h:, :] == 0) and torch.all(batch.tensors[0, :, :, w:] == 0)


def test_targets_are_not_modified_in_place(seed):
    images, targets = _images_and_targets(seed)
    before = [{k: v.clone() for k, v in t.items()} for t in targets]
    box_ids = [id(t["boxes"]) for t in targets]
    t = DetectionTransform(160, 320, MEAN, STD).train()
    _, out = t(images, targets)
    for original, copy, new, box_id in zip(before, targets, out, box_ids):
        assert id(copy["boxes"]) == box_id and torch.equal(copy["boxes"], original["boxes"])
        assert new is not copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_postprocess_matches_torchvision(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    images, _ = _images_and_targets(seed)
    ours = DetectionTransform(160, 320, MEAN, STD).eval()
    theirs = tv_transform.GeneralizedRCNNTransform(160, 320, MEAN, STD).eval()
    batch, _ = ours(images)
    originals = [tuple(img.shape[-2:]) for img in images]
    boxes = (torch.rand(len(images), 7, 4, generator=g) * 300).to(dtype)
    expected = theirs.postprocess([{"boxes": b.clone()} for b in boxes], batch.image_sizes, originals)
    batched = batched_postprocess_boxes(boxes, batch.image_sizes, originals)
    listed = ours.postprocess([{"boxes": b} for b in boxes], batch.image_sizes, originals)
    assert batched.dtype == dtype
    for i, e in enumerate(expected):
        if dtype == torch.bfloat16:  # fastdet multiplies in float32 and rounds once; torchvision rounds twice
            torch.testing.assert_close(batched[i], e["boxes"], rtol=1e-2, atol=0)
        else:
            assert torch.equal(batched[i], e["boxes"]), f"seed={seed}"
            assert torch.equal(listed[i]["boxes"], e["boxes"])
    if dtype == torch.float32:
        assert torch.equal(resize_boxes(boxes[0], batch.image_sizes[0], originals[0]), expected[0]["boxes"])


def test_bad_input():
    t = DetectionTransform(160, 320, MEAN, STD)
    with pytest.raises(ValueError, match=r"images\[1\].*\[C, H, W\]"):
        t([torch.rand(3, 10, 10), torch.rand(10, 10)])
    with pytest.raises(TypeError, match="floating point"):
        t([torch.zeros(3, 10, 10, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="3 channels"):
        t([torch.rand(1, 10, 10)])
    with pytest.raises(ValueError, match="one dict per image"):
        t([torch.rand(3, 10, 10)], [])
    with pytest.raises(ValueError, match="shape \\[B, K, 4\\]"):
        batched_postprocess_boxes(torch.rand(3, 4), [(1, 1)], [(1, 1)])
    with pytest.raises(ValueError, match="one entry per image"):
        batched_postprocess_boxes(torch.rand(2, 3, 4), [(1, 1)], [(1, 1)])
    for bad in (dict(min_size=0), dict(max_size=-1), dict(fixed_size=(3,)), dict(size_divisible=0)):
        with pytest.raises(ValueError):
            DetectionTransform(**{**dict(min_size=160, max_size=320, image_mean=MEAN, image_std=STD), **bad})
