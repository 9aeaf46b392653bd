"""Post-processing beyond hard NMS (issue 16): soft-NMS, weighted boxes fusion and NMW against ensemble-boxes (numpy,
numba), the package practitioners use for them, in the same run. ensemble-boxes runs on the CPU only; its column is
the report's "torchvision" column with a footnote naming it.

Inputs: ``normalised_detections`` (detector-like clustered boxes in [0, 1], uniform scores), IoU 0.3 / sigma 0.5 /
threshold 0.001 for gaussian soft-NMS (ensemble-boxes' soft_nms defaults apart from its iou_thr), and 3 models x 200
images of 100 boxes each for WBF (IoU 0.55, conf_type "avg") and NMW (IoU 0.55).
"""

from __future__ import annotations

import pytest
import torch

import fastdet
from benchmarks.common import cases, ensemble_boxes, normalised_detections

IMPLS = ("fastdet", "ensemble_boxes")


def _skip_cuda_for_ensemble_boxes(case, impl):
    if impl == "ensemble_boxes" and case.device == "cuda":
        pytest.skip("ensemble-boxes runs on the CPU only")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("soft_nms"))
def test_soft_nms(bench, case, impl):
    _skip_cuda_for_ensemble_boxes(case, impl)
    boxes, scores, _ = normalised_detections(case.params["n"])
    if impl == "fastdet":
        b, s = boxes.to(case.device), scores.to(case.device)
        bench(lambda: fastdet.ops.soft_nms(b, s, 0.3, 0.5, 0.001, "gaussian"), op="soft_nms", case=case,
              impl="fastdet")
    else:
        eb = ensemble_boxes()
        b, s, labels = [boxes.numpy()], [scores.numpy()], [torch.zeros(len(scores)).numpy()]
        bench(lambda: eb.soft_nms(b, s, labels, method=2, iou_thr=0.3, sigma=0.5, thresh=0.001), op="soft_nms",
              case=case, impl="torchvision", baseline="ensemble-boxes soft_nms (numpy)")


BOXES_PER_MODEL = 100


def _fusion_inputs(case):
    images, models = case.params["batch"], case.params["models"]
    return [[normalised_detections(BOXES_PER_MODEL, seed=models * b + m) for m in range(models)]
            for b in range(images)]


def _bench_fusion(bench, case, impl, op: str, fastdet_fn, eb_name: str):
    """fastdet's batched op on all images at once against ensemble-boxes' function in a loop over images."""
    _skip_cuda_for_ensemble_boxes(case, impl)
    per_image = _fusion_inputs(case)
    if impl == "fastdet":
        boxes, scores, labels = (
            torch.stack([torch.stack([d[k] for d in image]) for image in per_image]).to(case.device) for k in range(3)
        )
        bench(lambda: fastdet_fn(boxes, scores, labels, iou_threshold=0.55), op=op, case=case, impl="fastdet")
    else:
        fn = getattr(ensemble_boxes(), eb_name)
        lists = [([d[0].numpy() for d in image], [d[1].numpy() for d in image], [d[2].numpy() for d in image])
                 for image in per_image]

        def run():
            return [fn(b, s, lab, iou_thr=0.55, skip_box_thr=0.0) for b, s, lab in lists]

        bench(run, op=op, case=case, impl="torchvision",
              baseline=f"ensemble-boxes {eb_name} (numpy), a loop over images")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("weighted_boxes_fusion"))
def test_weighted_boxes_fusion(bench, case, impl):
    _bench_fusion(bench, case, impl, "weighted_boxes_fusion", fastdet.ops.weighted_boxes_fusion_batched,
                  "weighted_boxes_fusion")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("non_maximum_weighted"))
def test_non_maximum_weighted(bench, case, impl):
    _bench_fusion(bench, case, impl, "non_maximum_weighted", fastdet.ops.non_maximum_weighted_batched,
                  "non_maximum_weighted")
