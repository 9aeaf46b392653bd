"""``fastdet eval``: COCO evaluation of a trained checkpoint, with PR / F1 / confusion-matrix plots."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastdet.cli._common import EXIT_OK, CommandError, load_coco, pick_device, write_json
from fastdet.cli._ensemble import add_ensemble_arguments, load_models


def coco_paths(args, split: str) -> tuple[Path, Path]:
    """(images folder, annotation file) from ``--data ROOT`` (fastdet's COCO layout: ROOT/images and
    ROOT/annotations/instances_<split>.json) or the explicit ``--images``/``--annotations``."""
    images = getattr(args, "images", None)
    annotations = getattr(args, "annotations", None)
    if args.data is not None:
        root = Path(args.data)
        images = images or root / "images"
        annotations = annotations or root / "annotations" / f"instances_{split}.json"
    if images is None or annotations is None:
        raise CommandError("give --data ROOT (with images/ and annotations/instances_<split>.json) "
                           "or both --images and --annotations")
    return Path(images), Path(annotations)


def evaluate_and_report(model, dataset, device, spec_or_names, output: Path | None, batch_size: int = 4,
                        amp: bool = False, max_detections: int = 100, workers: int = 0, quiet: bool = False,
                        backend: str = "native"):
    """Run ``model`` over ``dataset``, print the 12 COCO stats and per-class AP, and (with ``output``) write
    metrics.json, pr_curve.png, f1_confidence.png and confusion_matrix.png (for a mask model also segm_pr_curve.png
    and segm_f1_confidence.png). Returns the CocoEvaluation."""
    from fastdet.data import make_data_loader, to_coco_dict
    from fastdet.eval import (
        collect_detections,
        confusion_matrix,
        confusion_matrix_from_evaluation,
        evaluate_detections,
        f1_confidence_curves,
        f1_confidence_from_evaluation,
        plot_confusion_matrix,
        plot_f1_confidence,
        plot_precision_recall,
        precision_recall_curves,
        targets_from_coco,
    )

    class_names = list(dataset.class_names)
    ground_truth = to_coco_dict(dataset)
    loader = make_data_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    start = time.perf_counter()
    detections = collect_detections(model, loader, device, amp=amp)
    seconds = time.perf_counter() - start
    evaluation = evaluate_detections(ground_truth, detections, dataset.label_to_category_id,
                                     max_detections=max_detections, backend=backend)
    if not quiet:
        print(f"\nCOCO box evaluation of {len(dataset)} images ({len(dataset) / seconds:.1f} images/s inference):")
        print(evaluation.summary)
        print("\nper-class AP (IoU 0.50:0.95):")
        for name, ap in evaluation.per_class_ap.items():
            print(f"  {name:20s} {ap:.3f}")
    segm = None
    if detections and all("segmentation" in d for d in detections):  # a mask model: mask AP next to box AP
        from fastdet.eval.segm import evaluate_segmentation

        segm = evaluate_segmentation(ground_truth, detections, dataset.label_to_category_id,
                                     max_detections=max_detections, backend=backend)
        if not quiet:
            print(f"\nCOCO mask (segm) evaluation:\n{segm.summary}")
    evaluation.segm = segm
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "metrics.json", {"stats": evaluation.stats, "per_class_ap": evaluation.per_class_ap,
                                             **({"segm_stats": segm.stats, "segm_per_class_ap": segm.per_class_ap}
                                                if segm is not None else {}),
                                             "images": len(dataset), "inference_images_per_second":
                                                 len(dataset) / seconds})
        plot_precision_recall(precision_recall_curves(evaluation), output / "pr_curve.png")
        if evaluation.matches is not None:
            # COCO's own matching by the native evaluator (rows and columns: the evaluation's categories)
            f1, names = f1_confidence_from_evaluation(evaluation), evaluation.category_names
            matrix = confusion_matrix_from_evaluation(evaluation)
        else:
            targets = targets_from_coco(ground_truth, [d["image_id"] for d in detections],
                                        dataset.label_to_category_id)
            f1, names = f1_confidence_curves(detections, targets, len(class_names)), class_names
            matrix = confusion_matrix(detections, targets, len(class_names))
        plot_f1_confidence(f1, output / "f1_confidence.png", names)
        plot_confusion_matrix(matrix, output / "confusion_matrix.png", names)
        written = ["metrics.json", "pr_curve.png", "f1_confidence.png", "confusion_matrix.png"]
        if segm is not None:  # the mask task's curves, next to the box task's
            plot_precision_recall(precision_recall_curves(segm), output / "segm_pr_curve.png")
            written.append("segm_pr_curve.png")
            if segm.matches is not None:
                plot_f1_confidence(f1_confidence_from_evaluation(segm), output / "segm_f1_confidence.png",
                                   segm.category_names)
                written.append("segm_f1_confidence.png")
        if not quiet:
            print(f"\nwrote {', '.join(written)} to {output}")
    evaluation.detections = detections
    return evaluation


def load_proposal_table(path, datasets, what: str = "--proposals"):
    """A proposals file (:func:`fastdet.models.proposals.load_proposals`) as a ``ProposalTable``, checked up front to
    have an entry for every image of ``datasets`` (a :class:`CommandError` naming the missing ids otherwise, rather
    than a ``KeyError`` in the middle of a run)."""
    from fastdet.models.proposals import ProposalTable, load_proposals

    try:
        table = ProposalTable(load_proposals(path))
    except (OSError, ValueError) as exc:
        raise CommandError(f"{what}: {exc}") from None
    for dataset in datasets:
        missing = sorted({int(r.image_id) for r in dataset.records} - set(table.proposals))
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise CommandError(f"{what} {path}: no proposals for {len(missing)} of the {len(dataset)} images "
                               f"(image ids {shown})")
    return table


def use_proposal_file(model, path: str, dataset, name: str) -> None:
    """``--proposals FILE``: the checkpoint's detector (R-CNN, Fast R-CNN or SPP-Net) takes its proposals from the file
    (:func:`fastdet.models.proposals.load_proposals`), looked up by the dataset's image ids, instead of its own
    generator. Every image of ``dataset`` must have an entry."""
    from fastdet.models.proposals import ExternalProposals

    if not isinstance(model, ExternalProposals):
        raise CommandError(f"--proposals: the checkpoint's detector {name!r} makes its own proposals; only R-CNN, "
                           "Fast R-CNN and SPP-Net checkpoints take external ones")
    model.replace_proposal_generator(load_proposal_table(path, [dataset]))


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.proposals is not None and (len(args.checkpoint) > 1 or args.tta):
        raise CommandError("--proposals evaluates one checkpoint without --tta (a proposal file's boxes belong to the "
                           "images as stored, not to flipped or rescaled views)")
    model, spec = load_models(args.checkpoint, device, args)
    images, annotations = coco_paths(args, args.split)
    dataset = load_coco(images, annotations, skip_bad=args.skip_bad, what="--annotations")
    if list(dataset.class_names) != list(spec["class_names"]):
        raise CommandError(f"{annotations}: classes {list(dataset.class_names)} differ from the checkpoint's "
                           f"{spec['class_names']}")
    if args.proposals is not None:
        use_proposal_file(model, args.proposals, dataset, spec["name"])
    with torch.inference_mode():
        evaluate_and_report(model, dataset, device, spec, Path(args.output) if args.output else None,
                            batch_size=args.batch_size, amp=args.amp, max_detections=args.max_detections,
                            workers=args.workers, backend=args.backend)
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="COCO-evaluate a checkpoint (12 stats, per-class AP, PR/F1/confusion plots)",
                       description="Evaluate a checkpoint written by `fastdet train`/`fastdet demo` on a COCO-format "
                                   "dataset (COCO protocol; fastdet's native evaluator by default).")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="checkpoint file (e.g. runs/demo/run/best.pt from `fastdet demo`, or last.pt beside it); "
                        "repeat it to evaluate an ensemble")
    p.add_argument("--data", help="dataset root in fastdet's COCO layout (images/, annotations/instances_<split>.json)")
    p.add_argument("--split", default="val", help="split of --data to evaluate (default: %(default)s)")
    p.add_argument("--images", help="image folder (overrides --data)")
    p.add_argument("--annotations", help="COCO instances JSON (overrides --data)")
    p.add_argument("--output", help="folder for metrics.json and the plots (default: print only)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-detections", type=int, default=100, help="COCO's per-image limit (default: %(default)s)")
    p.add_argument("--backend", choices=("native", "pycocotools"), default="native",
                   help="COCO evaluator: fastdet's native one or pycocotools (identical numbers; default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast inference")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (reported) instead of failing")
    p.add_argument("--proposals", metavar="FILE",
                   help="R-CNN / Fast R-CNN / SPP-Net: region proposals from this file (.json or .pt, boxes per image "
                        "id in original pixels, as fastdet.models.proposals.save_proposals writes) instead of the "
                        "checkpoint's own source (selective search by default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_ensemble_arguments(p)
    p.set_defaults(func=run)
