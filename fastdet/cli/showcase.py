"""``fastdet showcase``: runs the ops on realistic synthetic detections and compares them with torchvision and the
pure-PyTorch reference."""

from __future__ import annotations

import argparse
import time

import torch


def _synthetic_detections(n: int, num_classes: int, generator: torch.Generator, device: torch.device):
    """Boxes jittered around a few hundred object centres, as a detector's raw output looks."""
    centres = torch.rand(max(n // 30, 1), 2, generator=generator) * 1000
    owner = torch.randint(0, centres.shape[0], (n,), generator=generator)
    ctr = centres[owner] + torch.randn(n, 2, generator=generator) * 6
    wh = torch.rand(n, 2, generator=generator) * 80 + 20
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    scores = torch.rand(n, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return boxes.to(device), scores.to(device), labels.to(device)


def _time(fn, device: torch.device, repeat: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def showcase(args: argparse.Namespace) -> int:
    import fastdet
    from fastdet import ops
    from fastdet.ops import reference

    try:
        import torchvision.ops as tv
    except Exception:  # torchvision is optional
        tv = None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"fastdet {fastdet.__version__} | torch {torch.__version__} | device {device} | "
          f"CUDA kernels built: {fastdet._extension.WITH_CUDA}")
    gen = torch.Generator().manual_seed(args.seed)
    boxes, scores, labels = _synthetic_detections(args.num_boxes, 80, gen, device)
    rows = []

    def compare(name, ours, theirs, same):
        t_ours = _time(ours, device)
        t_tv = _time(theirs, device) if theirs is not None else float("nan")
        rows.append((name, t_ours, t_tv, same))

    iou = ops.box_iou(boxes[:2000], boxes[:2000])
    same = None
    if tv is not None:
        same = torch.allclose(iou, tv.box_iou(boxes[:2000], boxes[:2000]), atol=1e-6, equal_nan=True)
    compare("box_iou 2000x2000", lambda: ops.box_iou(boxes[:2000], boxes[:2000]),
            (lambda: tv.box_iou(boxes[:2000], boxes[:2000])) if tv else None, same)

    keep = ops.nms(boxes, scores, args.iou_threshold)
    same = torch.equal(keep, tv.nms(boxes, scores, args.iou_threshold)) if tv else None
    compare(f"nms N={args.num_boxes}", lambda: ops.nms(boxes, scores, args.iou_threshold),
            (lambda: tv.nms(boxes, scores, args.iou_threshold)) if tv else None, same)

    keep_b = ops.batched_nms(boxes, scores, labels, args.iou_threshold)
    same = None
    if tv is not None:
        theirs = tv.batched_nms(boxes, scores, labels, args.iou_threshold)
        same = set(keep_b.tolist()) == set(theirs.tolist())
    compare(f"batched_nms N={args.num_boxes}, 80 classes", lambda: ops.batched_nms(boxes, scores, labels, 0.5),
            (lambda: tv.batched_nms(boxes, scores, labels, 0.5)) if tv else None, same)

    small = slice(0, 300)
    agree = torch.equal(ops.nms(boxes[small], scores[small], 0.5), reference.nms(boxes[small], scores[small], 0.5)) \
        if hasattr(reference, "nms") else None

    batch_boxes = boxes[: (args.num_boxes // 4) * 4].reshape(4, -1, 4)
    batch_scores = torch.rand(4, batch_boxes.shape[1], 80, generator=gen).to(device)
    det_boxes, det_scores, det_labels, num = ops.multiclass_nms(batch_boxes, batch_scores, 0.05, 0.5, 100, 1000)
    rows.append((f"multiclass_nms B=4, N={batch_boxes.shape[1]}, C=80",
                 _time(lambda: ops.multiclass_nms(batch_boxes, batch_scores, 0.05, 0.5, 100, 1000), device),
                 float("nan"), None))

    print(f"\n{'op':44s} {'fastdet ms':>11s} {'torchvision ms':>15s} {'speed-up':>9s}  same result")
    for name, t_ours, t_tv, same in rows:
        ratio = t_tv / t_ours if t_tv == t_tv else float("nan")
        verdict = {True: "yes", False: "NO", None: "-"}[same]
        print(f"{name:44s} {t_ours:11.2f} {t_tv:15.2f} {ratio:9.2f}  {verdict}")
    print(f"\nnms kept {keep.numel()} of {args.num_boxes} boxes; batched_nms kept {keep_b.numel()}; "
          f"multiclass_nms detections per image: {num.tolist()}")
    if agree is not None:
        print(f"fastdet.ops.nms equals fastdet.ops.reference.nms on 300 boxes: {agree}")
    return 0 if all(same is not False for *_, same in rows) and agree is not False else 1


def add_parser(sub) -> None:
    p = sub.add_parser("showcase", help="run the ops on synthetic detections and compare them with torchvision",
                       description="Time fastdet's box/NMS ops on synthetic detections against torchvision and check "
                                   "that the results agree. Exit code 1 if any result differs.")
    p.add_argument("--num-boxes", type=int, default=20000, help="boxes per op (default: %(default)s)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="NMS IoU threshold (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=showcase)
