"""Post-processing beyond hard NMS (issue 16): soft-NMS and weighted boxes fusion against ensemble-boxes (numpy,
numba), the package practitioners use for them, in the same run. ensemble-boxes runs on the CPU only; its column is
the report's "torchvision" column with a footnote naming it.

Inputs: ``normalised_detections`` (detector-like clustered boxes in [0, 1], uniform scores), IoU 0.3 / sigma 0.5 /
threshold 0.001 for gaussian soft-NMS (ensemble-boxes' soft_nms defaults apart from its iou_thr), and 3 models x 200
images of 100 boxes each for WBF (IoU 0.55, conf_type "avg").
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("weighted_boxes_fusion"))
def test_weighted_boxes_fusion(bench, case, impl):
    _skip_cuda_for_ensemble_boxes(case, impl)
    images, models = case.params["batch"], case.params["models"]
    per_image = [[normalised_detections(BOXES_PER_MODEL, seed=models * b + m) for m in range(models)]
                 for b in range(images)]
    if impl == "fastdet":
        boxes = torch.stack([torch.stack([d[0] for d in image]) for image in per_image]).to(case.device)
        scores = torch.stack([torch.stack([d[1] for d in image]) for image in per_image]).to(case.device)
        labels = torch.stack([torch.stack([d[2] for d in image]) for image in per_image]).to(case.device)
        bench(lambda: fastdet.ops.weighted_boxes_fusion_batched(boxes, scores, labels, iou_threshold=0.55),
              op="weighted_boxes_fusion", case=case, impl="fastdet")
    else:
        eb = ensemble_boxes()
        lists = [([d[0].numpy() for d in image], [d[1].numpy() for d in image], [d[2].numpy() for d in image])
                 for image in per_image]

        def run():
            return [eb.weighted_boxes_fusion(b, s, lab, iou_thr=0.55, skip_box_thr=0.0) for b, s, lab in lists]

        bench(run, op="weighted_boxes_fusion", case=case, impl="torchvision",
              baseline="ensemble-boxes weighted_boxes_fusion (numpy), a loop over images")
