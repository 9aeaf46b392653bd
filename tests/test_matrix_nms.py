"""matrix_nms against the dense reference formulation (fastdet.ops.reference.matrix_nms, mmdetection's form)."""

from __future__ import annotations

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference
from tests.test_nms import clustered_boxes, fresh_seed, tied

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _check(got, exp, seed, rtol):
    assert torch.equal(got[0].cpu(), exp[0]), f"keep differs, seed={seed}"
    assert torch.equal(got[2].cpu(), exp[2]), f"num differs, seed={seed}"
    torch.testing.assert_close(got[1].cpu(), exp[1], rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_idxs", [False, True])
def test_matches_reference(device, kernel, dtype, with_idxs):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([clustered_boxes(200, seed + b, dtype=dtype)[0] for b in range(2)])
    scores = torch.rand(2, 200, generator=g, dtype=torch.float64).to(dtype)
    idxs = torch.randint(0, 4, (2, 200), generator=g) if with_idxs else None
    for max_output, threshold in ((50, 0.1), (300, 0.0), (0, 0.0)):
        got = ops.matrix_nms(boxes.to(device), scores.to(device), None if idxs is None else idxs.to(device),
                             max_output, kernel, 2.0, threshold)
        exp = reference.matrix_nms(boxes, scores, idxs, max_output, kernel, 2.0, threshold)
        _check(got, exp, seed, 1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_adversarial_inputs_and_unbatched(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(120, seed)
    scores = tied(scores, 6)  # ties: visit order by index
    boxes[3] = boxes[4]  # identical boxes: linear decay 0 and 0/0
    boxes[5] = float("nan")
    boxes[6, 2:] = boxes[6, :2]  # zero area
    scores[7] = float("nan")
    before = boxes.clone()
    for kernel in ("gaussian", "linear"):
        got = ops.matrix_nms(boxes.to(device), scores.to(device), None, 40, kernel, 0.5, 0.05)
        exp = reference.matrix_nms(boxes, scores, None, 40, kernel, 0.5, 0.05)
        assert got[0].shape == (40,) and got[2].shape == ()
        _check(got, exp, seed, 1e-6)
    torch.testing.assert_close(boxes, before, rtol=0, atol=0, equal_nan=True)


def test_half_inputs_and_errors():
    boxes, scores = clustered_boxes(50, 3)
    got = ops.matrix_nms(boxes.half(), scores.half(), None, 10)
    exp = reference.matrix_nms(boxes.half(), scores.half(), None, 10)
    assert got[1].dtype == torch.float16 and torch.equal(got[0], exp[0])
    keep, values, num = ops.matrix_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0), None, 4)
    assert keep.shape == (2, 4) and (keep == -1).all() and num.tolist() == [0, 0]
    with pytest.raises(ValueError, match="kernel must be"):
        ops.matrix_nms(boxes, scores, None, 5, kernel="box")
    with pytest.raises(ValueError, match="sigma must be"):
        ops.matrix_nms(boxes, scores, None, 5, sigma=-1.0)
    with pytest.raises(RuntimeError, match="scores must have shape"):
        ops.matrix_nms(boxes, scores[:4], None, 5)
    with pytest.raises(RuntimeError, match="idxs must be an integer"):
        ops.matrix_nms(boxes, scores, scores, 5)


def test_opcheck_and_compile():
    boxes, scores = clustered_boxes(40, 5)
    idxs = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.fastdet.matrix_nms, (boxes[None], scores[None], idxs[None], 2, 2.0, 0.0, 10))
    torch.library.opcheck(torch.ops.fastdet._matrix_nms_kernel, (boxes[None], idxs[None].long(), 1, 2.0))
    compiled = torch.compile(lambda b, s, i: ops.matrix_nms(b, s, i, 10), fullgraph=True, backend="aot_eager",
                             dynamic=True)
    for a, e in zip(compiled(boxes[None], scores[None], idxs[None]), ops.matrix_nms(boxes[None], scores[None],
                                                                                   idxs[None], 10)):
        assert torch.equal(a, e)
