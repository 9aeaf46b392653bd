"""Pieces shared by the sub-commands: errors that become exit codes, device choice, the model registry, checkpoints
that remember how to rebuild their model, and COCO dataset loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Exit codes scripts can rely on (also listed in `fastdet --help`).
EXIT_OK = 0
EXIT_FAILED_CHECK = 1  # ran, but a result check failed (showcase mismatch, demo targets missed with --require-targets)
EXIT_USAGE = 2  # bad arguments or bad input files (argparse uses 2 as well)
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A problem with what the user asked for (missing file, unknown model, bad value): printed without a traceback,
    exit code 2."""


def pick_device(spec: str | None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one, else the CPU; otherwise the named device, checked."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise CommandError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {spec}: CUDA is not available on this machine")
    return device


def model_names() -> list[str]:
    """The detector builders of :mod:`fastdet.models` (functions taking ``num_classes``)."""
    import fastdet.models as models

    return list(models.DETECTOR_BUILDERS)


def build_model(name: str, num_classes: int, **kwargs: Any) -> torch.nn.Module:
    import fastdet.models as models

    names = model_names()
    if name not in names:
        raise CommandError(f"--model: unknown detector {name!r}; choose one of {', '.join(names)}")
    return getattr(models, name)(num_classes=num_classes, **kwargs)


def model_spec(name: str, num_classes: int, kwargs: dict, class_names, label_to_category_id) -> dict:
    """What a checkpoint needs to rebuild its model and map its labels back to names and dataset category ids."""
    return {"name": name, "num_classes": int(num_classes), "kwargs": dict(kwargs), "class_names": list(class_names),
            "label_to_category_id": {int(k): int(v) for k, v in label_to_category_id.items()}}


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a checkpoint written by ``fastdet train``/``fastdet demo`` (its spec lives in
    ``config["extra"]["model"]``) and load its weights. Returns ``(model in eval mode on device, spec)``."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"--checkpoint: no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise CommandError(f"--checkpoint {path}: cannot be read as a torch checkpoint ({exc})") from None
    spec = None
    if isinstance(checkpoint, dict):
        spec = (checkpoint.get("config") or {}).get("extra", {}).get("model")
    if not isinstance(spec, dict) or "name" not in spec or "model" not in checkpoint:
        raise CommandError(f"--checkpoint {path}: not a fastdet training checkpoint (no model description); "
                           "checkpoints written by `fastdet train` or `fastdet demo` have one")
    model = build_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {}))
    model.load_state_dict(checkpoint["model"])
    spec["label_to_category_id"] = {int(k): int(v) for k, v in spec.get("label_to_category_id", {}).items()}
    return model.to(device).eval(), spec


def load_coco(images: str | Path, annotations: str | Path, transforms=None, skip_bad: bool = False, what: str = ""):
    from fastdet.data import CocoDetection

    images, annotations = Path(images), Path(annotations)
    if not annotations.is_file():
        raise CommandError(f"{what or 'annotations'}: no such file: {annotations}")
    if not images.is_dir():
        raise CommandError(f"{what or 'images'}: no such folder: {images}")
    dataset = CocoDetection(images, annotations, transforms=transforms, skip_bad=skip_bad)
    if skip_bad:
        print(f"[fastdet] {annotations.name}: {dataset.skipped.summary()}")
    if len(dataset) == 0:
        raise CommandError(f"{annotations}: the dataset has no images")
    return dataset


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as strict JSON: non-finite numbers (an undefined AP is NaN) become ``null``, at any depth;
    ``allow_nan=False`` makes anything else that is not JSON an error rather than a bare ``NaN`` in the file."""
    from fastdet.engine.metrics_log import json_safe

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(value), indent=2, allow_nan=False))
    return path
