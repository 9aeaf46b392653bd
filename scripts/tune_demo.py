"""Run the demo recipe end to end (generate, train, evaluate on the test split) and print time and COCO AP.

    python scripts/tune_demo.py --output /tmp/tune                       # the recipe as it is
    python scripts/tune_demo.py --set train.epochs=16 --set model_kwargs.image_size=160 --set dataset.image_size=160,160

``--set KEY.PATH=VALUE`` overrides one entry of :func:`fastdet.models.recipes.demo_recipe` (values are Python
literals; ``a,b`` is a tuple). The run uses the same pieces as ``fastdet demo`` (the shapes generator, CocoDetection,
the Trainer, pycocotools' COCOeval through fastdet.eval) but skips the plots and the validation pass, so the times are
those of the three steps that count. Threads are fixed to 2 (the target machine) unless ``--threads`` says otherwise.
The load average is printed at the start and the end: other processes sharing the cores make the times pessimistic.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "," in text:
            return tuple(parse_value(part) for part in text.split(","))
        return text


def apply_override(recipe: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set expects KEY.PATH=VALUE, got {item!r}")
    *parents, leaf = key.split(".")
    node = recipe
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = parse_value(value)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="/tmp/fastdet_tune_demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fastdet.data import CocoDetection, RandomHorizontalFlip, make_data_loader, make_shapes_dataset, to_coco_dict
    from fastdet.engine import Trainer, TrainConfig, build_data_loader
    from fastdet.eval import evaluate_model
    from fastdet.models.recipes import build_demo_model, demo_recipe

    recipe = demo_recipe()
    for item in args.set:
        apply_override(recipe, item)
    print(f"load average at start: {load_average()} (cores: {os.cpu_count()}, torch threads: {args.threads})")
    print(f"recipe: {recipe}", flush=True)
    output = Path(args.output)
    start = time.perf_counter()
    cpu_start = time.process_time()  # CPU seconds of this process: what the run costs whatever else shares the cores

    paths = make_shapes_dataset(output / "data", seed=args.seed, **recipe["dataset"])
    hflip = recipe.get("hflip", 0.0)
    train_set = CocoDetection(paths["images"], paths["train"], RandomHorizontalFlip(hflip) if hflip > 0 else None)
    test_set = CocoDetection(paths["images"], paths["test"])
    generate_seconds = time.perf_counter() - start
    print(f"generated {recipe['dataset']['num_images']} images in {generate_seconds:.1f}s "
          f"({len(train_set)} train, {len(test_set)} test)", flush=True)

    t = time.perf_counter()
    num_classes = len(train_set.class_names) + 1
    if recipe["model"] == demo_recipe()["model"] and recipe["model_kwargs"] == demo_recipe()["model_kwargs"]:
        model = build_demo_model(num_classes)
    else:
        import fastdet.models as models

        model = getattr(models, recipe["model"])(num_classes=num_classes, **recipe["model_kwargs"])
    config = TrainConfig(**{**recipe["train"], "device": "cpu", "seed": args.seed, "output_dir": None,
                            "progress": args.progress, "eval_every": 0})
    batch_size = recipe["batch_size"]
    loader = build_data_loader(train_set, batch_size=batch_size, shuffle=True, num_workers=args.workers,
                               seed=args.seed, drop_last=len(train_set) >= 2 * batch_size)
    trainer = Trainer(model, config, loader)
    history = trainer.fit()
    train_seconds = time.perf_counter() - t
    for record in history:
        losses = {k: round(v, 4) for k, v in record.items() if k.startswith("loss")}
        print(f"  epoch {record['epoch']:2d}: {losses} {record['images_per_s']:.1f} img/s")
    print(f"trained in {train_seconds:.1f}s", flush=True)

    t = time.perf_counter()
    test_loader = make_data_loader(test_set, batch_size=8, shuffle=False, num_workers=0)
    evaluation = evaluate_model(model, test_loader, to_coco_dict(test_set), "cpu", test_set.label_to_category_id)
    eval_seconds = time.perf_counter() - t
    total = time.perf_counter() - start
    print(evaluation.summary)
    ap, ap50 = evaluation.stats["AP"], evaluation.stats["AP50"]
    cpu_seconds = time.process_time() - cpu_start
    print(f"RESULT AP={ap:.3f} AP50={ap50:.3f} generate={generate_seconds:.0f}s train={train_seconds:.0f}s "
          f"eval={eval_seconds:.0f}s total={total:.0f}s cpu={cpu_seconds:.0f}s load_end={load_average()}")
    return 0 if ap50 >= 0.9 and ap >= 0.6 and total <= 600 else 1


if __name__ == "__main__":
    sys.exit(main())
