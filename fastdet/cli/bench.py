"""``fastdet bench``: a quick table of op timings against torchvision and the pure-PyTorch reference.

For the full, recorded benchmarks run ``python -m pytest benchmarks --benchmark-only`` from the repository root (how
to run and record them: benchmarks/README.md; measured numbers: benchmarks/RESULTS.md); this command is the
one-minute sanity check of a build on a new machine: it times each op on one moderate size, checks that fastdet's
result agrees with torchvision's (NMS up to the order of exactly tied scores), and prints the speed-ups.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from fastdet.cli._common import EXIT_FAILED_CHECK, EXIT_OK, CommandError, pick_device


def _median_ms(fn: Callable, device: torch.device, repeat: int) -> float:
    fn()  # warm-up (and lazy initialisation)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def _random_boxes(n: int, gen: torch.Generator, size: float = 800.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 8 + 4
    return torch.cat([xy, xy + wh], dim=1)


def nms_results_agree(keep_a: torch.Tensor, keep_b: torch.Tensor, scores: torch.Tensor) -> bool:
    """Whether two NMS results (kept indices into ``scores``, in keep order) agree up to the order of exactly tied
    scores: the same set of indices, and the same sequence of scores in keep order (``scores[keep_a]`` equal to
    ``scores[keep_b]`` elementwise). fastdet orders ties by index; torchvision's CPU batched NMS sorts them unstably
    on large inputs (see the README), so ``torch.equal`` on the indices would report a healthy build as wrong."""
    if keep_a.shape != keep_b.shape:
        return False
    if not torch.equal(keep_a.sort().values, keep_b.sort().values):
        return False
    return torch.equal(scores[keep_a], scores[keep_b])


def cases(device: torch.device, scale: float, gen: torch.Generator):
    """(name, fastdet fn, torchvision fn or None, reference fn or None, compare(ours, theirs) -> bool)."""
    from fastdet import ops
    from fastdet.ops import reference

    try:
        import torchvision.ops as tv
    except Exception:  # torchvision is optional
        tv = None

    def n(value: int) -> int:
        return max(int(value * scale), 8)

    def close(a, b):
        return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4, equal_nan=True)

    boxes = _random_boxes(n(10000), gen).to(device)
    scores = torch.rand(boxes.shape[0], generator=gen).to(device)
    idxs = torch.randint(0, 80, (boxes.shape[0],), generator=gen).to(device)
    def same_nms(a, b):
        return nms_results_agree(a, b, scores)

    yield (f"nms N={boxes.shape[0]}", lambda: ops.nms(boxes, scores, 0.5),
           tv and (lambda: tv.nms(boxes, scores, 0.5)), None, same_nms)
    yield (f"batched_nms N={boxes.shape[0]} C=80", lambda: ops.batched_nms(boxes, scores, idxs, 0.5),
           tv and (lambda: tv.batched_nms(boxes, scores, idxs, 0.5)), None, same_nms)
    b1, b2 = boxes[: n(2000)], boxes[: n(2000)]
    for name in ("box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou"):
        yield (f"{name} {b1.shape[0]}x{b2.shape[0]}", lambda f=getattr(ops, name): f(b1, b2),
               tv and (lambda f=getattr(tv, name): f(b1, b2)), lambda f=getattr(reference, name): f(b1, b2), close)
    feats = torch.randn(2, 256, 50, 50, generator=gen).to(device)
    rois = torch.cat([torch.randint(0, 2, (n(512), 1), generator=gen).float(),
                      _random_boxes(n(512), gen, 400.0)], dim=1).to(device)
    for name in ("roi_align", "roi_pool"):
        extra = {"sampling_ratio": 2} if name == "roi_align" else {}
        yield (f"{name} K={rois.shape[0]} C=256 7x7", lambda f=getattr(ops, name), e=extra: f(feats, rois, 7, 0.125, **e),
               tv and (lambda f=getattr(tv, name), e=extra: f(feats, rois, 7, 0.125, **e)), None, close)
    logits = (torch.randn(n(60000), 80, generator=gen) * 2 - 4.6).to(device)
    targets = (torch.rand(logits.shape, generator=gen) < 0.01).float().to(device)

    def focal(f):
        x = logits.detach().requires_grad_(True)
        loss = f(x, targets, reduction="sum")
        return torch.autograd.grad(loss, x)[0]

    yield (f"sigmoid_focal_loss fwd+bwd {logits.shape[0]}x80", lambda: focal(ops.sigmoid_focal_loss),
           tv and (lambda: focal(tv.sigmoid_focal_loss)), lambda: focal(reference.sigmoid_focal_loss), close)


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise CommandError(f"--repeat must be >= 1, got {args.repeat}")
    if not args.scale > 0:
        raise CommandError(f"--scale must be > 0, got {args.scale}")
    import fastdet

    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"fastdet {fastdet.__version__} | torch {torch.__version__} | device {device} | threads "
          f"{torch.get_num_threads()}")
    header = f"{'op':40s} {'fastdet':>10s} {'torchvision':>12s} {'x tv':>7s} {'reference':>10s} {'x ref':>7s}  agrees"
    print(header)
    print("-" * len(header))
    all_agree = True
    for name, ours, theirs, ref, compare in cases(device, args.scale, gen):
        t_ours = _median_ms(ours, device, args.repeat)
        t_tv = _median_ms(theirs, device, args.repeat) if theirs else float("nan")
        t_ref = _median_ms(ref, device, max(1, args.repeat // 3)) if ref and not args.no_reference else float("nan")
        agrees = compare(ours(), theirs()) if theirs else None
        all_agree &= agrees is not False

        def fmt(ms):
            return f"{ms:8.2f}ms" if ms == ms else f"{'-':>10s}"

        def ratio(ms):
            return f"{ms / t_ours:6.2f}x" if ms == ms else f"{'-':>7s}"

        print(f"{name:40s} {fmt(t_ours)} {fmt(t_tv):>12s} {ratio(t_tv)} {fmt(t_ref)} {ratio(t_ref)}  "
              f"{ {True: 'yes', False: 'NO', None: '-'}[agrees] }")
    print("\n'x tv' / 'x ref': how many times faster fastdet is (median of --repeat runs). The reference column "
          "times the pure-PyTorch oracle where it runs at the same size in reasonable time.")
    return EXIT_OK if all_agree else EXIT_FAILED_CHECK


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="quick op timing table vs torchvision and the reference",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per op (median reported)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every problem size by this")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference implementations")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
