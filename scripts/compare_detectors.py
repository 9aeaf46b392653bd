"""Compare fastdet's detectors on one synthetic shapes dataset: COCO AP / AP50 (and mask AP for mask models) on the
held-out test split, inference FPS at batch 1, FLOPs per image and parameter count, after the same training budget.

    python scripts/compare_detectors.py --output runs/compare            # train + evaluate every default detector
    python scripts/compare_detectors.py --output runs/compare --models yolo,fcos_resnet50_fpn --steps 200
    python scripts/compare_detectors.py --output runs/compare --markdown # the README table from the JSON files

Every detector gets the same data (generated once under OUTPUT/data), the same number of optimiser steps at the same
batch size (``--steps``, ``--batch-size``) and a per-detector wall-clock cap (``--time-cap``: training stops early
when the cap is reached, and the JSON records how many steps were done). Each detector's result is written to
``OUTPUT/<name>.json`` as soon as it is done, so a run can be interrupted, resumed and extended detector by detector:
detectors that already have a JSON file are skipped unless ``--force``. ``--quick`` is a smoke run (tiny data, a few
steps; the numbers mean nothing) that exercises every step for the whole list in a few minutes.

Speed is measured on the CPU with ``--threads`` threads for every detector (default: all cores), one test image at a
time through the trained detector's full ``forward`` (its own resizing and post-processing included); FLOPs are the
mean over the same images and count the matrix-multiply and convolution family only (as
:func:`fastdet.eval.count_flops`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

IMAGE_SIZE = 128

# Per-detector settings: builder keyword arguments that make the detector fit 128-px images, and optimiser choices.
# Anything not listed uses OPTIMIZER_DEFAULTS and the builder's own defaults. The training budget (steps, batch
# size, time cap) is the same for all and is not set here. A new detector (SPP-Net, R-CNN, ...) joins the default list
# by an entry here; it must follow the contract model(images, targets=targets) -> losses / model(images) -> detections
# (targets by keyword: the detectors on external proposals take them second and generate them when not given).
OPTIMIZER_DEFAULTS = {"lr": 1e-3, "weight_decay": 1e-4}
DETECTORS = {
    # The demo recipe's model (fastdet.models.recipes): YOLOv5n at 128 px with anchors fitted to the shapes data,
    # AdamW at its tuned lr / weight decay.
    "yolo": {"kwargs": None, "lr": 2e-3, "weight_decay": 0.05},  # None: taken from demo_recipe() at run time
    # VGG-16 SSD300 at 1/8 width: the input size is fixed at 300 (the transform resizes 128 -> 300).
    "ssd300_vgg16_light": {"kwargs": {}},
    # SSDlite320: no ImageNet file offline, so a randomly initialised backbone (torchvision's reduced tail); fixed
    # 320 input.
    "ssdlite320_mobilenet_v3_large": {"kwargs": {"weights_backbone": None}},
    # Light RetinaNet (ResNet-18, 128-channel FPN), kept at the data's 128 px instead of the builder's larger default.
    "retinanet_resnet18_fpn": {"kwargs": {"min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE}},
    # FCOS has no light builder: ResNet-50 FPN from random init (no ImageNet file offline), all stages trainable
    # with BatchNorm (frozen BN with random statistics would not train), at 128 px.
    "fcos_resnet50_fpn": {"kwargs": {"weights_backbone": None, "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE}},
    # Two-stage models at 128 px. 128 px images hold 1-6 objects, so far fewer RPN anchors / RoIs are sampled per
    # image than torchvision's 256 / 512 (COCO-sized) defaults: 64 anchors and 128 RoIs keep the same positive
    # fractions, and fewer proposals (600 train / 300 test instead of 2000 / 1000) cover the small images while
    # keeping a CPU step fast.
    "fasterrcnn_resnet18_fpn": {"kwargs": {
        "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE, "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 600,
        "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 300}},
    "maskrcnn_resnet18_fpn": {"kwargs": {
        "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE, "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 600,
        "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 300}},
    # Fast R-CNN and SPP-Net on their default selective-search proposals (fast mode), capped like the Faster R-CNN
    # entry's RPN (600 train / 300 test), with the same 128 sampled RoIs per image.
    "fast_rcnn_resnet18_fpn": {"kwargs": {
        "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE, "box_batch_size_per_image": 128, "max_proposals_train": 600,
        "max_proposals_test": 300}},
    "sppnet_resnet18": {"kwargs": {
        "min_size": IMAGE_SIZE, "max_size": IMAGE_SIZE, "box_batch_size_per_image": 128, "max_proposals_train": 600,
        "max_proposals_test": 300}},
    # R-CNN on the same capped selective-search proposals; regions warped to 64 x 64 (the light builder's default;
    # the paper's 227 would cost ~12x more per region on the CPU) and the paper's 32 + 96 fine-tuning sample.
    "rcnn_resnet18": {"kwargs": {"max_proposals_train": 600, "max_proposals_test": 300}},
    # EfficientDet-D0 (issue 15): the builder's input size (512, the paper's) down to the data's 128 px; the P3-P7
    # pyramid then has 16 x 16 ... 1 x 1 maps. Its backbone is randomly initialised by default, like the others here.
    "efficientdet_d0": {"kwargs": {"image_size": IMAGE_SIZE}},
}
# The default list: the detectors above that exist in this fastdet (later ones are added by name as they land).
DEFAULT_MODELS = tuple(DETECTORS)

FULL = {"num_images": 600, "steps": 300, "batch_size": 8, "time_cap": 1200.0, "fps_iters": 20, "fps_warmup": 3}
QUICK = {"num_images": 8, "steps": 2, "batch_size": 2, "time_cap": 30.0, "fps_iters": 1, "fps_warmup": 0}
DATASET = {"image_size": (IMAGE_SIZE, IMAGE_SIZE), "shapes": 3, "min_objects": 1, "max_objects": 6,
           "min_size": 0.15, "max_size": 0.45, "split": (0.8, 0.1, 0.1), "masks": True}
QUICK_DATASET = {"max_objects": 3, "split": (0.5, 0.0, 0.5)}

COLUMNS = ("detector", "params (M)", "GFLOPs", "FPS (CPU, bs 1)", "AP", "AP50", "mask AP", "steps", "train s")


def available_models() -> list[str]:
    import fastdet.models as models

    return [name for name in models.DETECTOR_BUILDERS if hasattr(models, name)]


def model_kwargs(name: str) -> dict:
    entry = DETECTORS.get(name, {})
    kwargs = entry.get("kwargs", {})
    if kwargs is None:  # the demo recipe's architecture
        from fastdet.models.recipes import demo_recipe

        kwargs = demo_recipe()["model_kwargs"]
    return dict(kwargs)


def make_data(root: Path, num_images: int, quick: bool, seed: int) -> dict:
    """The shapes dataset under ``root``, generated once: reused when ``root/params.json`` matches."""
    from fastdet.data import make_shapes_dataset

    params = {**DATASET, **(QUICK_DATASET if quick else {}), "num_images": num_images, "seed": seed}
    params_file = root / "params.json"
    splits = ("train", "test")
    paths = {"images": root / "images", **{s: root / "annotations" / f"instances_{s}.json" for s in splits}}
    if not (params_file.is_file() and json.loads(params_file.read_text()) == json.loads(json.dumps(params))
            and all(paths[s].is_file() for s in splits)):
        made = make_shapes_dataset(root, **params)
        paths = {key: made[key] for key in ("images", *splits)}
        params_file.write_text(json.dumps(params))
    return {"paths": paths, "params": params}


def train(model, loader, steps: int, time_cap: float, lr: float, weight_decay: float, device) -> dict:
    """AdamW (no weight decay on norms and biases), linear warmup over 10 % of the steps then cosine decay to 5 %,
    gradient norm clipped at 10 (as the demo recipe); stops after ``steps`` optimiser steps or when ``time_cap``
    seconds have passed. Returns the steps done and timings."""
    from fastdet.engine import TrainConfig
    from fastdet.engine.schedule import WarmupSchedule
    from fastdet.engine.trainer import build_optimizer

    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=lr, weight_decay=weight_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(steps, "cosine", warmup_iters=max(1, steps // 10), min_lr_ratio=0.05))
    model.train()
    done, start, last_loss, step_times = 0, time.perf_counter(), math.nan, []
    while done < steps and time.perf_counter() - start < time_cap:
        for images, targets in loader:
            t = time.perf_counter()
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
                       for target in targets]
            losses = model(images, targets=targets)
            loss = torch.stack(list(losses.values())).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {done + 1}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            done += 1
            last_loss = float(loss.detach())
            step_times.append(time.perf_counter() - t)
            if done % 25 == 0 or done == steps:
                print(f"    step {done}/{steps} loss {last_loss:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
            if done >= steps or time.perf_counter() - start >= time_cap:
                break
    seconds = time.perf_counter() - start
    # the first step pays one-off costs (allocator warm-up, lazy initialisation): the typical step is the median of
    # the later ones
    typical = sorted(step_times[1:] or step_times) or [math.nan]
    return {"steps": done, "train_seconds": seconds, "seconds_per_step": typical[len(typical) // 2],
            "final_loss": last_loss, "capped": done < steps}


def speed_on_images(model, dataset, warmup: int, iters: int) -> tuple[float, float]:
    """Mean FLOPs per image and images per second at batch 1, on the first ``iters`` test images (cycled if there are
    fewer). Real images rather than random ones (as :mod:`fastdet.eval.speed` uses): the RoI heads of two-stage
    models and every detector's post-processing cost depends on how many boxes the trained model keeps. FLOPs:
    ``FlopCounterMode``, the matrix-multiply and convolution family, as :func:`fastdet.eval.count_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    images = [dataset[i % len(dataset)][0] for i in range(iters)]
    model.eval()
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            for image in images:
                model([image])
        flops = counter.get_total_flops() / len(images)
        for image in images[:warmup]:
            model([image])
        start = time.perf_counter()
        for image in images:
            model([image])
        seconds = time.perf_counter() - start
    return float(flops), len(images) / max(seconds, 1e-12)


def run_one(name: str, data: dict, budget: dict, threads: int, seed: int) -> dict:
    import fastdet.models as models
    from fastdet.cli._common import load_coco
    from fastdet.cli.train import train_transforms
    from fastdet.data import make_data_loader, to_coco_dict
    from fastdet.eval import collect_detections, evaluate_detections

    device = torch.device("cpu")
    paths = data["paths"]
    train_set = load_coco(paths["images"], paths["train"], train_transforms(0.5))  # flips, as `fastdet demo`
    test_set = load_coco(paths["images"], paths["test"])
    kwargs = model_kwargs(name)
    entry = DETECTORS.get(name, {})
    torch.manual_seed(seed)
    model = getattr(models, name)(num_classes=len(train_set.class_names) + 1, **kwargs).to(device)
    params = sum(p.numel() for p in model.parameters())

    loader = make_data_loader(train_set, batch_size=budget["batch_size"], shuffle=True, seed=seed,
                              drop_last=len(train_set) >= 2 * budget["batch_size"])
    lr = entry.get("lr", OPTIMIZER_DEFAULTS["lr"])
    weight_decay = entry.get("weight_decay", OPTIMIZER_DEFAULTS["weight_decay"])
    trained = train(model, loader, budget["steps"], budget["time_cap"], lr, weight_decay, device)

    model.eval()
    detections = collect_detections(model, make_data_loader(test_set, batch_size=8), device)
    ground_truth = to_coco_dict(test_set)
    box = evaluate_detections(ground_truth, detections, test_set.label_to_category_id)
    result = {"AP": box.stats["AP"], "AP50": box.stats["AP50"], "mask_AP": None, "mask_AP50": None}
    if detections and all("segmentation" in d for d in detections):
        from fastdet.eval.segm import evaluate_segmentation

        segm = evaluate_segmentation(ground_truth, detections, test_set.label_to_category_id)
        result.update(mask_AP=segm.stats["AP"], mask_AP50=segm.stats["AP50"])
    flops, fps = speed_on_images(model, test_set, budget["fps_warmup"], budget["fps_iters"])
    return {
        "detector": name, "kwargs": kwargs, "lr": lr, "weight_decay": weight_decay, **result,
        "parameters": params, "flops": flops, "fps": fps, **trained, "budget_steps": budget["steps"],
        "batch_size": budget["batch_size"], "time_cap": budget["time_cap"], "train_images": len(train_set),
        "test_images": len(test_set), "dataset": data["params"], "threads": threads, "seed": seed,
        "quick": budget.get("quick", False), "torch": torch.__version__, "machine": platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(),
    }


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(output: Path) -> str:
    """The README table from every ``OUTPUT/*.json`` result, in the default order then by name."""
    rows = []
    for path in sorted(output.glob("*.json")):
        result = json.loads(path.read_text())
        if isinstance(result, dict) and "detector" in result and "AP" in result:
            rows.append(result)
    order = {name: i for i, name in enumerate(DEFAULT_MODELS)}
    rows.sort(key=lambda r: (order.get(r["detector"], len(order)), r["detector"]))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for r in rows:
        steps = f"{r['steps']}" + (f" of {r['budget_steps']} (capped)" if r.get("capped") else "")
        lines.append("| " + " | ".join([
            f"`{r['detector']}`", _cell(r["parameters"] / 1e6, ".2f"), _cell(r["flops"] / 1e9, ".2f"),
            _cell(r["fps"], ".1f"), _cell(r["AP"], ".3f"), _cell(r["AP50"], ".3f"), _cell(r.get("mask_AP"), ".3f"),
            steps, _cell(r["train_seconds"], ".0f")]) + " |")
    if rows:
        r = rows[0]
        lines.append("")
        lines.append(f"{r['train_images']} training / {r['test_images']} test images of {IMAGE_SIZE} x {IMAGE_SIZE} "
                     f"px, batch {r['batch_size']}, at most {r['budget_steps']} steps"
                     + (f" or {r['time_cap']:.0f} s" if r.get("time_cap") is not None else "")
                     + f" of training each, {r['threads']} CPU thread(s), torch {r['torch']}"
                     + (" (QUICK smoke run: numbers are meaningless)" if any(x.get("quick") for x in rows) else ""))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="results folder: one JSON per detector, and the data")
    p.add_argument("--models", help="comma-separated builder names (default: " + ",".join(DEFAULT_MODELS)
                                    + ", those that exist)")
    p.add_argument("--steps", type=int, help=f"optimiser steps per detector (default {FULL['steps']}, "
                                             f"quick {QUICK['steps']})")
    p.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}, quick {QUICK['batch_size']}")
    p.add_argument("--num-images", type=int, help=f"dataset size before the split (default {FULL['num_images']}, "
                                                  f"quick {QUICK['num_images']})")
    p.add_argument("--time-cap", type=float, help=f"training seconds per detector (default {FULL['time_cap']:.0f})")
    p.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, a few steps")
    p.add_argument("--force", action="store_true", help="rerun detectors that already have a result")
    p.add_argument("--markdown", action="store_true", help="print the table of all results in OUTPUT and exit")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if args.markdown:
        table = markdown_table(output)
        print(table)
        return 0 if table.count("\n") > 1 else 1
    budget = dict(QUICK if args.quick else FULL, quick=args.quick)
    for key in ("steps", "batch_size", "num_images", "time_cap"):
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                sys.exit(f"--{key.replace('_', '-')} must be positive, got {value}")
            budget[key] = value
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    known = available_models()
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            sys.exit(f"--models: unknown detector(s) {', '.join(unknown)}; available: {', '.join(known)}")
    else:
        names = [n for n in DEFAULT_MODELS if n in known]
        missing = [n for n in DEFAULT_MODELS if n not in known]
        if missing:
            print(f"[compare] not in this fastdet yet, skipped: {', '.join(missing)}")
    output.mkdir(parents=True, exist_ok=True)
    data = make_data(output / "data", budget["num_images"], args.quick, args.seed)
    print(f"[compare] {len(names)} detector(s), {budget['steps']} steps of batch {budget['batch_size']}, "
          f"cap {budget['time_cap']:.0f}s each, {threads} thread(s); data in {output / 'data'}")
    failed = []
    for name in names:
        path = output / f"{name}.json"
        if path.is_file() and not args.force:
            print(f"[compare] {name}: done already ({path}); --force reruns it")
            continue
        print(f"[compare] {name} {model_kwargs(name)}", flush=True)
        start = time.perf_counter()
        try:
            result = run_one(name, data, budget, threads, args.seed)
        except Exception as exc:  # one broken detector must not lose the others' results
            print(f"[compare] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
            continue
        from fastdet.cli._common import write_json

        write_json(path, result)
        print(f"[compare] {name}: AP {result['AP']:.3f} AP50 {result['AP50']:.3f}, {result['fps']:.1f} FPS, "
              f"{result['flops'] / 1e9:.2f} GFLOPs, {result['parameters'] / 1e6:.2f} M params, "
              f"{result['steps']} steps at {result['seconds_per_step']:.2f} s/step "
              f"({time.perf_counter() - start:.0f}s in all) -> {path}", flush=True)
    print("\n" + markdown_table(output))
    if failed:
        print(f"\n[compare] failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
