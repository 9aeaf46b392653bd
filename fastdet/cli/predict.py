"""``fastdet predict``: run a checkpoint on images or folders; boxes (and a mask model's masks, as RLE) out as JSON and
drawn onto PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastdet.cli._common import EXIT_OK, CommandError, pick_device, write_json
from fastdet.cli._ensemble import add_ensemble_arguments, load_models

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); anything else is an error naming it."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"{path}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise CommandError(f"{path}: no such file or folder")
    return paths


def read_image(path: Path) -> torch.Tensor:
    from fastdet.data._base import load_image

    try:
        return load_image(path)
    except Exception as exc:
        raise CommandError(f"{path}: cannot read image ({exc})") from None


def run(args: argparse.Namespace) -> int:
    from fastdet.visualize import save_detections

    if not 0.0 <= args.score_threshold <= 1.0:
        raise CommandError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    model, spec = load_models(args.checkpoint, device, args)
    names = spec["class_names"]
    paths = collect_inputs(args.inputs)
    output = Path(args.output)
    results = []
    for start in range(0, len(paths), args.batch_size):
        batch_paths = paths[start:start + args.batch_size]
        images = [read_image(p) for p in batch_paths]
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            detections = model([image.to(device) for image in images])
        for path, image, det in zip(batch_paths, images, detections):
            keep = det["scores"] >= args.score_threshold
            boxes, labels, scores = (det[k][keep].float().cpu() if k != "labels" else det[k][keep].cpu()
                                     for k in ("boxes", "labels", "scores"))
            masks = det["masks"][keep].float().cpu() if "masks" in det else None
            results.append({
                "file": str(path), "width": int(image.shape[-1]), "height": int(image.shape[-2]),
                "detections": [{"box_xyxy": [round(v, 2) for v in b], "label": int(lab),
                                "class_name": names[int(lab) - 1] if 1 <= int(lab) <= len(names) else str(int(lab)),
                                "score": round(float(s), 4)}
                               for b, lab, s in zip(boxes.tolist(), labels.tolist(), scores.tolist())],
            })
            if masks is not None:  # a mask model: each detection's mask (probability > 0.5) as COCO RLE
                from fastdet.eval.segm import masks_to_rles

                for entry, rle in zip(results[-1]["detections"], masks_to_rles(masks)):
                    entry["segmentation"] = rle
            if not args.no_draw:
                save_detections(output / f"{path.stem}_detections.png", image, boxes, labels, scores, names,
                                masks=masks)
            print(f"{path}: {len(boxes)} detection(s)")
    write_json(output / "predictions.json", results)
    print(f"wrote {output / 'predictions.json'}" + ("" if args.no_draw else " and the drawn images"))
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in images; write predictions.json and drawn PNGs",
                       description="Run a checkpoint on image files and/or folders of images. Writes "
                                   "OUTPUT/predictions.json (boxes as x1 y1 x2 y2 pixels, class names, scores) and "
                                   "OUTPUT/<name>_detections.png.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="checkpoint written by `fastdet train` or `fastdet demo`; repeat it to ensemble models")
    p.add_argument("--output", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-draw", action="store_true", help="write only the JSON")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast inference")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_ensemble_arguments(p)
    p.set_defaults(func=run)
