"""The reference NMS family is the oracle for fastdet's NMS kernels, so it is checked on its own: against torchvision
where their semantics coincide (distinct scores), and on hand-built cases for every rule torchvision leaves open
(ties, NaN, the exact threshold, padding)."""

from __future__ import annotations

import pytest
import torch

from fastdet.ops import reference as ref

nan = float("nan")


def torchvision_ops():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    import torchvision.ops

    return torchvision.ops


def random_detections(gen, n, dtype, device, num_classes=3):
    corner = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 100
    size = 5 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 40
    boxes = torch.cat([corner, corner + size], dim=1).to(dtype).to(device)
    # distinct scores: where the visit order is unambiguous, torchvision's (unstable) sort agrees with ours
    scores = (torch.randperm(n, generator=gen).to(torch.float64) / n).to(dtype).to(device)
    idxs = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    return boxes, scores, idxs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_nms_matches_torchvision(device, dtype, threshold, seed):
    tv_ops = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    boxes, scores, _ = random_detections(gen, 150, dtype, device)
    # torchvision's kernel computes the IoU in the box dtype; ours in float32 for float16, so give it float32 boxes
    tv_boxes = boxes.float() if dtype == torch.float16 else boxes
    expected = tv_ops.nms(tv_boxes, scores.to(tv_boxes.dtype), threshold)
    actual = ref.nms(boxes, scores, threshold)
    assert actual.dtype == torch.int64
    assert actual.tolist() == expected.tolist(), f"seed={seed}"


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_batched_nms_is_per_category_nms(device, threshold, seed):
    tv_ops = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    boxes, scores, idxs = random_detections(gen, 120, torch.float32, device)
    # per-category torchvision NMS, merged by score: the definition, without the coordinate-offset trick
    kept = torch.cat([torch.where(idxs == c)[0][tv_ops.nms(boxes[idxs == c], scores[idxs == c], threshold)]
                      for c in idxs.unique()])
    expected = kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    assert ref.batched_nms(boxes, scores, idxs, threshold).tolist() == expected.tolist(), f"seed={seed}"


def test_nms_rules(device):
    def run(boxes, scores, threshold):
        boxes = torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        return ref.nms(boxes, torch.tensor(scores, device=device), threshold).tolist()

    # [0,0,4,1] vs [0,0,2,1]: IoU exactly 0.5, and suppression needs strictly more
    assert run([[0, 0, 4, 1], [0, 0, 2, 1]], [0.9, 0.8], 0.5) == [0, 1]
    assert run([[0, 0, 4, 1], [0, 0, 2, 1]], [0.9, 0.8], 0.4999) == [0]
    # equal scores: the lower index is visited (and kept) first
    assert run([[0, 0, 1, 1]] * 3, [0.5, 0.9, 0.9], 0.5) == [1]
    # a NaN score sorts first, as torch.sort puts it
    assert run([[0, 0, 1, 1]] * 3, [0.9, nan, 0.8], 0.5) == [1]
    # a box with a NaN coordinate has a NaN IoU with everything: it neither suppresses nor is suppressed
    assert run([[nan, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], [0.9, 0.8, 0.7], 0.5) == [0, 1]
    assert run([[0, 0, 1, 1], [nan, 0, 1, 1]], [0.9, 0.8], 0.5) == [0, 1]
    # a suppressed box suppresses nothing: A kills B, B would have killed C, so C survives
    assert run([[0, 0, 2, 1], [1, 0, 3, 1], [2, 0, 4, 1]], [0.9, 0.8, 0.7], 0.3) == [0, 2]
    # two zero-area boxes at the same place: 0 / 0 is NaN, so no suppression
    assert run([[1, 1, 1, 1], [1, 1, 1, 1]], [0.9, 0.8], 0.0) == [0, 1]
    assert run([], [], 0.5) == []


def test_threshold_compared_exactly():
    # IoU 1/3 in float32 is 0.3333333432674408; a float32 comparison would round the threshold 0.33333334 onto it
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    iou = torch.tensor(1.0) / torch.tensor(3.0)
    threshold = 0.33333334  # between float32(1/3) and the next float32 up, nearer the upper one
    assert (iou > threshold).item() is False and iou.item() > threshold  # the trap the reference avoids
    assert ref.nms(boxes, torch.tensor([0.9, 0.8]), threshold).tolist() == [0]


def test_batched_nms_categories(device):
    boxes = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.float32, device=device)
    scores = torch.tensor([0.6, 0.9, 0.8, 0.7], device=device)
    idxs = torch.tensor([0, 1, 0, 1], device=device)
    # one survivor per category, listed by score across categories
    assert ref.batched_nms(boxes, scores, idxs, 0.5).tolist() == [1, 2]


def test_nms_fixed(device):
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], dtype=torch.float32, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], device=device)

    keep, num = ref.nms_fixed(boxes, scores, None, 0.5, max_output=5)
    assert keep.tolist() == [0, 2, 3, -1, -1] and keep.dtype == torch.int64
    assert num.shape == () and num.dtype == torch.int64 and num.item() == 3

    keep, num = ref.nms_fixed(boxes, scores, torch.tensor([0, 1, 0, 0], device=device), 0.5, max_output=2)
    assert keep.tolist() == [0, 1] and num.item() == 2  # truncated

    batch_boxes = torch.stack([boxes, boxes.flip(0)])
    batch_scores = torch.stack([scores, scores])
    keep, num = ref.nms_fixed(batch_boxes, batch_scores, None, 0.5, max_output=4)
    assert keep.shape == (2, 4) and num.tolist() == [3, 3]
    assert keep.tolist() == [[0, 2, 3, -1], [0, 1, 2, -1]]

    keep, num = ref.nms_fixed(boxes[:0], scores[:0], None, 0.5, max_output=3)
    assert keep.tolist() == [-1, -1, -1] and num.item() == 0
    with pytest.raises(ValueError, match="max_output"):
        ref.nms_fixed(boxes, scores, None, 0.5, max_output=-1)


def test_multiclass_nms_shared_boxes(device):
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], dtype=torch.float64, device=device)
    scores = torch.tensor(
        [[[0.9, 0.2, 0.3],  # box 0
          [0.8, 0.2, 0.9],  # box 1: class 2 ties box 0's class 0 -> flat index 0 (n=0, c=0) comes first
          [0.1, nan, 0.05]]],  # box 2: float32(0.1) = 0.1000000015 > 0.1 passes (exact comparison); NaN never does
        dtype=torch.float32, device=device,
    )
    det_boxes, det_scores, det_labels, num = ref.multiclass_nms(
        boxes, scores, score_threshold=0.1, iou_threshold=0.5, max_detections=5, pre_nms_top_k=10
    )
    # candidates by score: (0,0) .9, (1,2) .9, (1,0) .8, (0,2) .3, (0,1) .2, (1,1) .2, (2,0) .1
    # class 0: (1,0) is suppressed by (0,0) (IoU .81); class 2: (0,2) is suppressed by (1,2); class 1: (1,1) by (0,1)
    assert det_labels.tolist() == [[0, 2, 1, 0, -1]]
    assert det_scores.dtype == torch.float32 and det_boxes.dtype == torch.float64
    assert det_scores[0, :4].tolist() == pytest.approx([0.9, 0.9, 0.2, 0.1])
    assert det_boxes[0, :4].tolist() == [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    assert det_boxes[0, 4:].abs().sum().item() == 0 and det_scores[0, 4:].abs().sum().item() == 0
    assert num.tolist() == [4] and num.dtype == torch.int64 and det_labels.dtype == torch.int64

    # class-agnostic: everything overlapping box 0 goes, whatever its class; the far box 2 stays
    _, _, labels, num = ref.multiclass_nms(boxes, scores, 0.1, 0.5, 5, 10, class_agnostic=True)
    assert labels.tolist() == [[0, 0, -1, -1, -1]] and num.tolist() == [2]

    # top-k before NMS: only (0,0) and (1,2) enter
    _, _, labels, num = ref.multiclass_nms(boxes, scores, 0.1, 0.5, 5, pre_nms_top_k=2)
    assert labels.tolist() == [[0, 2, -1, -1, -1]]

    # max_detections truncates after NMS
    _, _, labels, num = ref.multiclass_nms(boxes, scores, 0.1, 0.5, max_detections=1, pre_nms_top_k=10)
    assert labels.tolist() == [[0]] and num.tolist() == [1]


def test_multiclass_nms_per_class_boxes_and_batch(device):
    # [B=2, N=2, C=2, 4]: each class has its own box for the same anchor
    boxes = torch.tensor(
        [
            [[[0, 0, 10, 10], [50, 50, 60, 60]], [[0, 0, 10, 9], [0, 0, 10, 10]]],
            [[[0, 0, 1, 1], [0, 0, 1, 1]], [[5, 5, 6, 6], [5, 5, 6, 6]]],
        ],
        dtype=torch.float32,
        device=device,
    )
    scores = torch.tensor([[[0.9, 0.8], [0.7, 0.6]], [[0.0, 0.0], [0.0, 0.5]]], device=device)
    det_boxes, det_scores, det_labels, num = ref.multiclass_nms(boxes, scores, 0.05, 0.5, 4, 100)
    # image 0: class 0 keeps (0,0) and drops (1,0) (IoU .9); class 1 keeps (0,1) and (1,1) (far apart)
    assert det_labels[0].tolist() == [0, 1, 1, -1]
    assert det_boxes[0, 1].tolist() == [50, 50, 60, 60] and det_boxes[0, 2].tolist() == [0, 0, 10, 10]
    # image 1: only (1,1) passes the threshold
    assert det_labels[1].tolist() == [1, -1, -1, -1] and num.tolist() == [3, 1]


def test_multiclass_score_threshold_is_exact():
    # float16 0.3 is 0.30004883 > 0.3: it passes a strict threshold of 0.3 (a float16 comparison would reject it)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    scores = torch.tensor([[[0.3]]], dtype=torch.float16)
    *_, num = ref.multiclass_nms(boxes, scores, 0.3, 0.5, 1, 1)
    assert num.tolist() == [1]


def test_multiclass_nms_properties(device, seed):
    """Random inputs: whatever comes out must be ordered, above threshold, and free of same-class overlaps."""
    gen = torch.Generator().manual_seed(seed)
    boxes, _, _ = random_detections(gen, 60, torch.float32, device)
    scores = torch.rand(1, 60, 4, generator=gen).to(device)
    det_boxes, det_scores, det_labels, num = ref.multiclass_nms(boxes[None], scores, 0.2, 0.4, 50, 120)
    n = num.item()
    assert n <= 50 and (det_labels[0, n:] == -1).all() and (det_labels[0, :n] >= 0).all()
    s = det_scores[0, :n]
    assert (s > 0.2).all() and (s[:-1] >= s[1:]).all(), f"seed={seed}"
    for c in det_labels[0, :n].unique():
        same = det_boxes[0, :n][det_labels[0, :n] == c]
        iou = ref.box_iou(same, same).fill_diagonal_(0)
        assert (iou <= 0.4).all(), f"same-class survivors overlap [seed={seed}]"
