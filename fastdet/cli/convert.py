"""``fastdet convert``: convert a dataset between COCO, YOLO, VOC and KITTI, optionally re-splitting it."""

from __future__ import annotations

import argparse

from fastdet.cli._common import EXIT_OK, CommandError

FORMATS = ("coco", "yolo", "voc", "kitti")


def run(args: argparse.Namespace) -> int:
    from fastdet.data.convert import convert_dataset, split_dataset

    class_names = args.class_names.split(",") if args.class_names else None
    if args.split is not None:
        report = split_dataset(args.src, args.dst, args.src_format, args.dst_format, ratios=args.split,
                               seed=args.seed, skip_bad=args.skip_bad, class_names=class_names,
                               link_images=args.link_images)
    else:
        report = convert_dataset(args.src, args.src_format, args.dst, args.dst_format, skip_bad=args.skip_bad,
                                 class_names=class_names, link_images=args.link_images)
    print(report)
    if report.lost and args.strict:
        raise CommandError(f"--strict: the {args.dst_format} format could not hold everything (see 'lost' above)")
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a dataset between coco, yolo, voc and kitti (optionally re-split)",
                       description="Convert the dataset at SRC to DST, keeping its splits, or pooling them and "
                                   "drawing a new seeded train/val/test split with --split. Prints what the target "
                                   "format cannot hold (e.g. YOLO has no iscrowd/difficult flags).")
    p.add_argument("src", help="source dataset folder (COCO: folder with annotations/ and images/, or one JSON)")
    p.add_argument("dst", help="destination folder")
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS)
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None,
                   help="re-split with these ratios, e.g. --split 0.8 0.1 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    p.add_argument("--class-names", help="comma-separated class list for formats without one (YOLO without "
                                         "data.yaml names, VOC, KITTI)")
    p.add_argument("--link-images", action="store_true", help="hard-link images instead of copying where possible")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples (reported) instead of failing")
    p.add_argument("--strict", action="store_true", help="exit with code 2 if the conversion loses information")
    p.set_defaults(func=run)
