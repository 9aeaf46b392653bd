"""``fastdet train``: train any fastdet detector on a COCO-format dataset with :class:`fastdet.engine.Trainer`."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from fastdet.cli._common import EXIT_OK, CommandError, build_model, load_coco, model_names, model_spec
from fastdet.cli.evaluate import coco_paths, load_proposal_table


def parse_model_args(items: list[str] | None) -> dict:
    """``["min_size=320", "trainable_backbone_layers=5"]`` -> kwargs; values are Python literals (strings may be
    bare)."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CommandError(f"--model-arg: expected NAME=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def train_transforms(hflip: float):
    """Training augmentation: horizontal flips with probability ``hflip`` (0 disables)."""
    if hflip <= 0:
        return None
    from fastdet.data.transforms import RandomHorizontalFlip

    return RandomHorizontalFlip(hflip)


def build_pretrained(model_name: str, num_classes: int, model_kwargs: dict, weights, weights_backbone):
    """The model to train and the keyword arguments that rebuild its architecture without any weights file (what the
    checkpoint records). With ``weights``: the pretrained model with its class heads replaced for ``num_classes``
    (fine-tuning); with ``weights_backbone`` only: a new detector on a pretrained backbone."""
    from fastdet.models.weights import finetune_model, rebuild_kwargs

    if model_name not in model_names():
        raise CommandError(f"--model: unknown detector {model_name!r}; choose one of {', '.join(model_names())}")
    kwargs = dict(model_kwargs)
    if weights_backbone is not None:  # otherwise the builder's default (torchvision's: ImageNet for some models)
        kwargs["weights_backbone"] = weights_backbone
    try:
        if weights is not None:
            model = finetune_model(model_name, num_classes, weights=weights, **kwargs)
        else:
            model = build_model(model_name, num_classes, **kwargs)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # missing file, bad name, hash or shape mismatch
        raise CommandError(f"{model_name} weights: {exc}") from None
    return model, {**model_kwargs, **rebuild_kwargs(model, model_kwargs)}


def fit(model_name: str, model_kwargs: dict, train_set, val_set, config, batch_size: int, workers: int,
        weights=None, weights_backbone=None):
    """Build the model for ``train_set``'s classes (from ``weights``/``weights_backbone`` when given) and train it;
    returns the Trainer (after ``fit``)."""
    from fastdet.data import make_data_loader, to_coco_dict
    from fastdet.engine import Trainer, build_data_loader

    num_classes = len(train_set.class_names) + 1  # + background, fastdet's (and torchvision's) convention
    model, spec_kwargs = build_pretrained(model_name, num_classes, model_kwargs, weights, weights_backbone)
    config.extra["model"] = model_spec(model_name, num_classes, spec_kwargs, train_set.class_names,
                                       train_set.label_to_category_id)
    train_loader = build_data_loader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     seed=config.seed, drop_last=len(train_set) >= 2 * batch_size)
    val_loader = ground_truth = None
    if val_set is not None:
        val_loader = make_data_loader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
        ground_truth = to_coco_dict(val_set)
    trainer = Trainer(model, config, train_loader, val_loader, ground_truth, train_set.label_to_category_id)
    trainer.fit()
    return trainer


def use_proposal_file(model_kwargs: dict, train_set, val_set) -> None:
    """``--model-arg proposal_generator=FILE`` (R-CNN, Fast R-CNN, SPP-Net on precomputed proposals): the file must
    cover every training and validation image (checked now, not at the first missing id); its path is stored absolute
    in the checkpoint (evaluation looks the boxes up by image id); and the training images get their proposals in
    their targets ahead of the augmentation (:class:`fastdet.data.AttachProposals`), so that a flipped image trains
    on flipped proposals."""
    from fastdet.data import AttachProposals, Compose

    source = model_kwargs.get("proposal_generator")
    if not isinstance(source, str):
        return
    table = load_proposal_table(source, [train_set] + ([val_set] if val_set is not None else []),
                                "--model-arg proposal_generator")
    model_kwargs["proposal_generator"] = str(Path(source).resolve())
    attach = AttachProposals(table.proposals)
    train_set.transforms = attach if train_set.transforms is None else Compose([attach, train_set.transforms])


def run(args: argparse.Namespace) -> int:
    from fastdet.engine import TrainConfig

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    images, train_ann = coco_paths(argparse.Namespace(data=args.data, images=args.images,
                                                      annotations=args.train_annotations), "train")
    train_set = load_coco(images, train_ann, train_transforms(args.hflip), args.skip_bad, "--train-annotations")
    val_set = None
    if args.val_annotations or (args.data and (Path(args.data) / "annotations" / "instances_val.json").is_file()):
        _, val_ann = coco_paths(argparse.Namespace(data=args.data, images=args.images,
                                                   annotations=args.val_annotations), "val")
        val_set = load_coco(images, val_ann, None, args.skip_bad, "--val-annotations")
        if val_set.class_names != train_set.class_names:
            raise CommandError(f"{val_ann}: classes {list(val_set.class_names)} differ from the training set's "
                               f"{list(train_set.class_names)}")
    model_kwargs = parse_model_args(args.model_arg)
    use_proposal_file(model_kwargs, train_set, val_set)
    try:
        config = TrainConfig(
            epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
            weight_decay=args.weight_decay, schedule=args.schedule, warmup_iters=args.warmup_iters,
            milestones=tuple(args.milestones), amp=args.amp, grad_clip_norm=args.grad_clip, device=args.device,
            seed=args.seed, output_dir=args.output, log_format=args.log_format, progress=not args.no_progress,
            eval_every=args.eval_every if val_set is not None else 0, early_stopping_patience=args.patience,
            resume_from=args.resume,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    trainer = fit(args.model, model_kwargs, train_set, val_set, config, args.batch_size,
                  args.workers, args.weights, args.weights_backbone)
    if trainer.context.is_main:
        print(f"\ntrained {trainer.epoch} epoch(s); checkpoints and metrics log in {args.output}")
        if trainer.last_evaluation is not None:
            print(trainer.last_evaluation.summary)
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a detector on a COCO-format dataset",
                       description="Train a fastdet detector. Data: --data ROOT in fastdet's COCO layout "
                                   "(ROOT/images, ROOT/annotations/instances_train.json and, if present, "
                                   "instances_val.json for periodic evaluation), or explicit --images and "
                                   "--train-annotations [--val-annotations]. Other formats: `fastdet convert` "
                                   "first. Multi-GPU: `torchrun --nproc_per_node=N -m fastdet train ...`.")
    p.add_argument("--model", default="yolo_n", help="detector builder in fastdet.models (default: %(default)s); "
                                                    "one of: " + ", ".join(_safe_model_names()))
    p.add_argument("--model-arg", action="append", metavar="NAME=VALUE",
                   help="keyword argument for the builder, e.g. min_size=320 (repeatable)")
    p.add_argument("--weights", help="fine-tune from pretrained weights: DEFAULT, a torchvision weights name (e.g. "
                                     "COCO_V1) or a .pth file; the class heads are replaced for the dataset's classes. "
                                     "Published files are read from the torch hub cache (no download unless "
                                     "FASTDET_ALLOW_DOWNLOAD=1)")
    p.add_argument("--weights-backbone", help="pretrained backbone weights (e.g. DEFAULT, IMAGENET1K_V1, or a .pth)")
    p.add_argument("--data", help="dataset root in fastdet's COCO layout")
    p.add_argument("--images", help="image folder (overrides --data)")
    p.add_argument("--train-annotations", help="COCO instances JSON for training (overrides --data)")
    p.add_argument("--val-annotations", help="COCO instances JSON for validation (overrides --data)")
    p.add_argument("--output", default="runs/train", help="checkpoints and metrics log (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--milestones", type=int, nargs="*", default=[], help="epochs at which a step schedule decays")
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal-flip probability (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=1, help="COCO evaluation every N epochs (0: never)")
    p.add_argument("--patience", type=int, default=None, help="early stopping after N evaluations without gain")
    p.add_argument("--resume", help="checkpoint to resume from (e.g. runs/train/last.pt)")
    p.add_argument("--log-format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (reported) instead of failing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=run)


def _safe_model_names() -> list[str]:
    try:
        return model_names()
    except Exception:  # --help must work even if the models cannot be imported
        return []
