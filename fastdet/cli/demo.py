"""``fastdet demo``: the end-to-end job. Generate the synthetic shapes dataset, train a CPU-sized detector, evaluate
it on the held-out test split (COCO protocol, fastdet's native evaluator), and write plots and drawn detections.

Target on a 2-core CPU: under 10 minutes in all, AP50 >= 0.9 and AP >= 0.6 on the test split. The recipe (model,
image size, dataset size, schedule) lives in :func:`fastdet.models.recipes.demo_recipe`; it uses the GPU when there
is one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from fastdet.cli._common import EXIT_FAILED_CHECK, EXIT_OK, CommandError, load_coco, pick_device

TARGET_AP50 = 0.9
TARGET_AP = 0.6
TARGET_SECONDS = 600


def predict_command(checkpoint: Path, images: Path, output: Path) -> str:
    """The ``fastdet predict`` command line of the demo's closing hint, runnable as printed (copy-paste): this
    interpreter by its absolute path with ``-m fastdet`` (a bare ``fastdet`` is on PATH only while its environment
    is active) and absolute paths, quoted for the shell where needed."""
    python = os.path.abspath(sys.executable) if sys.executable else "python"  # not resolved: keeps a venv's link
    return shlex.join([python, "-m", "fastdet", "predict", "--checkpoint", os.path.abspath(checkpoint),
                       os.path.abspath(images), "--output", os.path.abspath(output)])


def run(args: argparse.Namespace) -> int:
    from fastdet.cli.evaluate import evaluate_and_report
    from fastdet.cli.train import fit, train_transforms
    from fastdet.data import make_shapes_dataset
    from fastdet.engine import TrainConfig
    from fastdet.models.recipes import demo_recipe
    from fastdet.visualize import save_detections

    start = time.perf_counter()
    device = pick_device(args.device)
    if args.workers is None:
        args.workers = 0 if device.type == "cpu" and (os.cpu_count() or 1) <= 4 else 2
    elif args.workers < 0:
        raise CommandError(f"--workers must be >= 0, got {args.workers}")
    recipe = demo_recipe(quick=args.quick)
    if args.epochs is not None:
        if args.epochs < 1:
            raise CommandError(f"--epochs must be >= 1, got {args.epochs}")
        recipe["train"]["epochs"] = args.epochs
    if args.num_images is not None:
        if args.num_images < 10:
            raise CommandError(f"--num-images must be >= 10 (train/val/test splits), got {args.num_images}")
        recipe["dataset"]["num_images"] = args.num_images
    output = Path(args.output)
    print(f"[demo] device {device}, threads {torch.get_num_threads()}; recipe: model {recipe['model']} "
          f"{recipe['model_kwargs']}, {recipe['dataset']['num_images']} images of "
          f"{recipe['dataset']['image_size']}, {recipe['train']['epochs']} epochs, batch {recipe['batch_size']}")

    # 1. data
    t = time.perf_counter()
    paths = make_shapes_dataset(output / "data", seed=args.seed, **recipe["dataset"])
    images = paths["images"]
    train_set = load_coco(images, paths["train"], train_transforms(recipe.get("hflip", 0.5)))
    val_set = load_coco(images, paths["val"])
    test_set = load_coco(images, paths["test"])
    print(f"[demo] generated {len(train_set)} train / {len(val_set)} val / {len(test_set)} test images, classes "
          f"{list(train_set.class_names)} in {time.perf_counter() - t:.1f}s -> {output / 'data'}")

    # 2. training (validation AP after the last epoch; checkpoints in OUTPUT/run)
    config = TrainConfig(**{**recipe["train"], "device": str(device), "seed": args.seed,
                            "output_dir": str(output / "run"), "progress": not args.no_progress,
                            "eval_every": recipe["train"]["epochs"]})
    t = time.perf_counter()
    trainer = fit(recipe["model"], recipe["model_kwargs"], train_set, val_set, config, recipe["batch_size"],
                  args.workers)
    train_seconds = time.perf_counter() - t
    print(f"[demo] trained in {train_seconds:.0f}s; checkpoint {output / 'run' / 'last.pt'}")

    # 3. evaluation on the held-out test split, plots and drawn detections
    model = trainer.model.eval()
    with torch.inference_mode():
        evaluation = evaluate_and_report(model, test_set, device, None, output / "eval", batch_size=8,
                                         workers=args.workers)
    by_id = {d["image_id"]: d for d in evaluation.detections}
    drawn = output / "detections"
    for index in range(min(args.draw, len(test_set))):
        image, target = test_set[index]
        det = by_id[int(target["image_id"])]
        save_detections(drawn / f"test_{index:03d}.png", image, det["boxes"], det["labels"], det["scores"],
                        test_set.class_names, score_threshold=0.3)
    total = time.perf_counter() - start
    ap50, ap = evaluation.stats["AP50"], evaluation.stats["AP"]
    met = ap50 >= TARGET_AP50 and ap >= TARGET_AP and total <= TARGET_SECONDS
    print(f"\n[demo] test AP50 {ap50:.3f} (target >= {TARGET_AP50}), AP {ap:.3f} (target >= {TARGET_AP}), "
          f"total {total:.0f}s (target <= {TARGET_SECONDS}s): {'targets met' if met else 'TARGETS MISSED'}")
    print(f"[demo] plots in {output / 'eval'}, drawn detections in {drawn}; try:\n"
          f"  {predict_command(output / 'run' / 'last.pt', images, output / 'predict')}")
    return EXIT_FAILED_CHECK if args.require_targets and not met else EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate shapes data, train a small detector, evaluate it (the main job)",
                       description=__doc__.split("\n\n", 1)[1].strip().replace("\n", " ") if __doc__ else None)
    p.add_argument("--output", default="runs/demo", help="everything goes here (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--num-images", type=int, default=None, help="override the recipe's dataset size")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that exercises every step; "
                                                       "it does not reach the accuracy targets")
    p.add_argument("--require-targets", action="store_true",
                   help="exit with code 1 when the AP or time targets are missed")
    p.add_argument("--draw", type=int, default=8, help="test images to draw detections on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading worker processes (default: 0 on a CPU with <= 4 cores, where workers would "
                        "compete with the training threads; else 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=run)
