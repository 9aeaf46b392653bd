"""``fastdet proposals``: selective-search region proposals for every image of a COCO-format dataset, computed once and
saved by image id (the file ``fastdet train --model-arg proposal_generator=FILE`` and ``fastdet eval --proposals FILE``
read), as R-CNN and Fast R-CNN precomputed theirs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastdet.cli._common import EXIT_OK, CommandError, load_coco
from fastdet.cli.evaluate import coco_paths


def run(args: argparse.Namespace) -> int:
    import torch

    from fastdet.models.proposals import SelectiveSearchProposals, save_proposals

    output = Path(args.output)
    if output.suffix.lower() not in (".json", ".pt", ".pth"):
        raise CommandError(f"--output must end in .json, .pt or .pth, got {output.name!r}")
    if args.max_proposals is not None and args.max_proposals < 1:
        raise CommandError(f"--max-proposals must be >= 1, got {args.max_proposals}")
    if args.max_side is not None and args.max_side < 1:
        raise CommandError(f"--max-side must be >= 1, got {args.max_side}")
    datasets = []
    for split in args.split if args.annotations is None else ["given by --annotations"]:
        images, annotations = coco_paths(args, split)
        datasets.append(load_coco(images, annotations, skip_bad=args.skip_bad, what="--annotations"))
    search = SelectiveSearchProposals(args.mode, args.max_proposals, args.max_proposals, args.max_side,
                                      seed=args.seed).eval()
    total = sum(len(d) for d in datasets)
    table, start = {}, time.perf_counter()
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="selective search", dynamic_ncols=True)
    with torch.inference_mode():
        for dataset in datasets:
            for index in range(len(dataset)):
                image, target = dataset[index]
                image_id = int(target["image_id"])
                if image_id in table:
                    raise CommandError(f"image id {image_id} appears twice in the splits {args.split}; a proposals "
                                       "file maps each id to one image")
                table[image_id] = search(image)
                if progress is not None:
                    progress.update()
    if progress is not None:
        progress.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    save_proposals(output, table)
    seconds = time.perf_counter() - start
    boxes = sum(len(b) for b in table.values())
    print(f"wrote {output}: {boxes} proposals for {len(table)} images ({boxes / max(len(table), 1):.0f} per image, "
          f"{seconds / max(len(table), 1):.2f} s per image, selective search {args.mode} mode)")
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("proposals", help="precompute selective-search proposals of a dataset (R-CNN, Fast R-CNN)",
                       description="Run selective search on every image of one or more splits of a COCO-format "
                                   "dataset and save the boxes by image id (.json or .pt), for `fastdet train "
                                   "--model-arg proposal_generator=FILE` and `fastdet eval --proposals "
                                   "FILE`.")
    p.add_argument("--data", help="dataset root in fastdet's COCO layout (images/, annotations/instances_<split>.json)")
    p.add_argument("--split", nargs="+", default=["train", "val"],
                   help="splits of --data to cover (default: %(default)s)")
    p.add_argument("--images", help="image folder (overrides --data)")
    p.add_argument("--annotations", help="COCO instances JSON (overrides --data; one split)")
    p.add_argument("--output", required=True, help="proposals file to write (.json or .pt)")
    p.add_argument("--mode", choices=("single", "fast", "quality"), default="fast",
                   help="selective search strategies (default: %(default)s, the papers' setting)")
    p.add_argument("--max-proposals", type=int, default=2000,
                   help="best-ranked boxes kept per image (default: %(default)s; detectors cap again at use)")
    p.add_argument("--max-side", type=int, default=500,
                   help="images with a longer side are searched downscaled to it, boxes scaled back (default: "
                        "%(default)s, as the detectors' built-in search)")
    p.add_argument("--seed", type=int, default=0, help="the ranking's random draw (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (reported) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
