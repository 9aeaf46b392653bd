"""Pretrained weights for the builders: torchvision's weight enums (or their names), ``.pth`` files and state dicts,
loaded from the local torch hub cache without touching the network unless asked to.

What ``weights=`` / ``weights_backbone=`` accept (:func:`resolve_weights`):

* a torchvision weight enum member (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``) or its name as a string:
  ``"DEFAULT"``, ``"COCO_V1"``, ``"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"``; torchvision need not be installed:
  :data:`WEIGHTS` lists the files (name, URL, hash prefix) and metadata fastdet needs. With torchvision installed, the
  enum's own metadata (categories) is used.
* a path (``str`` or ``os.PathLike``) to a ``.pth`` file holding a state dict, or a fastdet training checkpoint
  (its ``"model"`` entry is used);
* a state dict (any mapping of names to tensors).

Enum weights are read from ``torch.hub.get_dir()/checkpoints/<file>`` (torchvision's cache, so files torchvision
downloaded are found), and the file's SHA-256 must start with the hash prefix in its name (torchvision's
convention, ``name-<prefix>.pth``). A missing file raises :class:`WeightsNotFoundError` at once, naming the file, its
URL and the folder to put it in; nothing is downloaded unless the user opts in: set the environment variable
``FASTDET_ALLOW_DOWNLOAD=1``, or call :func:`download_weights` (``fastdet.models.weights.download_weights(
"FasterRCNN_ResNet50_FPN_Weights.COCO_V1")``), or pass ``download=True`` to :meth:`Weights.get_state_dict`.

Builder signature and conventions (every detector builder follows them; a new builder, e.g. Mask R-CNN's, should too)::

    def maskrcnn_resnet50_fpn(*, weights=None, progress=True, num_classes=None, weights_backbone=None,
                              trainable_backbone_layers=None, **kwargs):
        plan = plan_build("MaskRCNN_ResNet50_FPN_Weights", "ResNet50_Weights", weights=weights,
                          weights_backbone=weights_backbone, num_classes=num_classes,
                          trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=5,
                          default_trainable_layers=3, norm_layer=kwargs.pop("norm_layer", None))
        backbone = resnet_fpn_backbone(50, trainable_layers=plan.trainable_backbone_layers,
                                       norm_layer=plan.norm_layer,
                                       body_state_dict=plan.backbone_state_dict(progress))
        model = MaskRCNN(backbone, num_classes=plan.num_classes, **kwargs)
        return plan.load_into(model, progress)

:func:`plan_build` applies torchvision's rules: given ``weights``, ``weights_backbone`` is ignored and
``num_classes`` comes from the weights' categories (a different explicit value is an error: build with the weights,
then call ``model.replace_class_heads(n)`` or use :func:`finetune_model`); without weights ``num_classes`` defaults to
91. ``trainable_backbone_layers`` defaults to ``default_trainable_layers`` when anything is pretrained and to
``max_trainable_layers`` otherwise, and must lie in ``[0, max]`` (torchvision ignores an explicit value for an
untrained model with a warning; fastdet applies it). ``norm_layer`` (a fastdet extra: a module class, or the strings
``"FrozenBatchNorm2d"`` / ``"BatchNorm2d"``) defaults to ``FrozenBatchNorm2d`` when pretrained and ``BatchNorm2d``
otherwise. :meth:`BuildPlan.load_into` loads the weights strictly and applies torchvision's ``eps = 0`` override of
the frozen batch norms for the checkpoints trained before torchvision's eps fix (``fasterrcnn_resnet50_fpn``,
``retinanet_resnet50_fpn``, ``maskrcnn_resnet50_fpn`` COCO_V1; not the v2 ones).

Fine-tuning relies on ``model.replace_class_heads(num_classes)`` (``FasterRCNN``, ``RetinaNet``, ``SSD``, ``FCOS`` have
it); a detector with more class-dependent heads (Mask R-CNN's mask predictor) extends it. A builder that derives an
architecture choice from the weights must let a keyword repeat it, and :func:`rebuild_kwargs` record it, so that a
training checkpoint rebuilds without the weights file (``fastdet train`` stores those keywords).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "COCO_CATEGORIES",
    "BuildPlan",
    "DOWNLOAD_ENV",
    "LocalWeights",
    "WEIGHTS",
    "Weights",
    "WeightsHashError",
    "WeightsNotFoundError",
    "download_weights",
    "finetune_model",
    "rebuild_kwargs",
    "plan_build",
    "resolve_norm_layer",
    "resolve_weights",
]

DOWNLOAD_ENV = "FASTDET_ALLOW_DOWNLOAD"

# The 91 labels of torchvision's COCO detection models (index = label; "N/A" are ids COCO does not use).
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_BASE_URL = "https://download.pytorch.org/models/"


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is not in the local cache and downloading was not allowed."""


class WeightsHashError(RuntimeError):
    """A cached weights file does not have the hash its name promises (truncated or foreign file)."""


@dataclass(frozen=True)
class Weights:
    """One published checkpoint: torchvision's enum name and member, its file and metadata.

    ``num_classes`` is the number of outputs of the checkpoint's classifier (91 for COCO detection, 1000 for
    ImageNet, None for a features-only backbone); ``frozen_bn_eps`` is the eps torchvision sets on the frozen batch
    norms after loading (0 for checkpoints trained before its eps fix), None to leave it.
    """

    enum: str
    name: str
    file: str
    num_classes: int | None
    frozen_bn_eps: float | None = None
    dataset: str = "COCO"
    _categories: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return _BASE_URL + self.file

    @property
    def key(self) -> str:
        return f"{self.enum}.{self.name}"

    @property
    def hash_prefix(self) -> str:
        match = _HASH_IN_NAME.search(self.file)
        return match.group(1) if match else ""

    @property
    def meta(self) -> dict[str, Any]:
        """``{"categories", "num_classes", "url", "file"}``: torchvision's enum metadata when torchvision is installed
        and knows the enum, otherwise fastdet's table."""
        categories = self._categories
        tv_meta = _torchvision_meta(self.enum, self.name)
        if tv_meta is not None and tv_meta.get("categories") is not None:
            categories = tuple(tv_meta["categories"])
        num_classes = len(categories) if categories is not None else self.num_classes
        return {"categories": categories, "num_classes": num_classes, "url": self.url, "file": self.file}

    def cache_path(self) -> Path:
        """Where the file is looked for: ``torch.hub.get_dir()/checkpoints/<file>`` (``TORCH_HOME`` moves it)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file

    def get_state_dict(self, progress: bool = True, download: bool | None = None) -> dict[str, torch.Tensor]:
        """The checkpoint's state dict from the cache (hash checked). ``download``: fetch a missing file (None:
        only when ``FASTDET_ALLOW_DOWNLOAD=1``); otherwise a missing file raises :class:`WeightsNotFoundError`
        immediately."""
        return _load_state_dict_file(self.ensure_cached(progress, download))

    def ensure_cached(self, progress: bool = True, download: bool | None = None) -> Path:
        """The cached file's path, after checking its hash (fetching it first only if downloads are allowed, see
        :meth:`get_state_dict`)."""
        path = self.cache_path()
        if not path.is_file():
            if download is None:
                download = os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")
            if not download:
                raise WeightsNotFoundError(
                    f"{self.key}: weights file {self.file!r} is not in the local cache {path.parent}. Download "
                    f"{self.url} and put it at {path} (e.g. `curl -L -o {path} {self.url}`), or allow fastdet to "
                    f"download it: set {DOWNLOAD_ENV}=1 or call fastdet.models.weights.download_weights("
                    f"{self.key!r}).")
            _download(self, path, progress)
        _check_hash(path, self.hash_prefix, self.key)
        return path


@dataclass(frozen=True)
class LocalWeights:
    """Weights given as a ``.pth`` path or a state dict (no metadata: ``num_classes`` comes from the caller)."""

    source: Any  # Path or Mapping
    num_classes: int | None = None
    frozen_bn_eps: float | None = None

    def ensure_cached(self, progress: bool = True, download: bool | None = None) -> None:
        if isinstance(self.source, Path) and not self.source.is_file():
            raise FileNotFoundError(f"weights file not found: {self.source}")

    @property
    def meta(self) -> dict[str, Any]:
        return {"categories": None, "num_classes": None}

    @property
    def key(self) -> str:
        return str(self.source) if isinstance(self.source, Path) else "state dict"

    def get_state_dict(self, progress: bool = True, download: bool | None = None) -> Mapping[str, torch.Tensor]:
        if isinstance(self.source, Path):
            self.ensure_cached()
            return _load_state_dict_file(self.source)
        return self.source


def _entries(enum: str, default: str, members: dict[str, tuple[str, int | None, float | None]],
             dataset: str) -> dict[str, Weights]:
    table = {}
    for name, (file, num_classes, eps) in members.items():
        categories = COCO_CATEGORIES if dataset == "COCO" else None
        table[name] = Weights(enum, name, file, num_classes, eps, dataset, categories)
    table["DEFAULT"] = table[default]
    return table


# torchvision's published files (facts: names with their SHA-256 prefixes, classifier sizes, eps override).
WEIGHTS: dict[str, dict[str, Weights]] = {
    "FasterRCNN_ResNet50_FPN_Weights": _entries("FasterRCNN_ResNet50_FPN_Weights", "COCO_V1", {
        "COCO_V1": ("fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", 91, 0.0)}, "COCO"),
    "FasterRCNN_ResNet50_FPN_V2_Weights": _entries("FasterRCNN_ResNet50_FPN_V2_Weights", "COCO_V1", {
        "COCO_V1": ("fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth", 91, None)}, "COCO"),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": _entries("FasterRCNN_MobileNet_V3_Large_FPN_Weights", "COCO_V1", {
        "COCO_V1": ("fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth", 91, None)}, "COCO"),
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": _entries(
        "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights", "COCO_V1", {
            "COCO_V1": ("fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth", 91, None)}, "COCO"),
    "RetinaNet_ResNet50_FPN_Weights": _entries("RetinaNet_ResNet50_FPN_Weights", "COCO_V1", {
        "COCO_V1": ("retinanet_resnet50_fpn_coco-eeacb38b.pth", 91, 0.0)}, "COCO"),
    "RetinaNet_ResNet50_FPN_V2_Weights": _entries("RetinaNet_ResNet50_FPN_V2_Weights", "COCO_V1", {
        "COCO_V1": ("retinanet_resnet50_fpn_v2_coco-5905b1c5.pth", 91, None)}, "COCO"),
    "SSD300_VGG16_Weights": _entries("SSD300_VGG16_Weights", "COCO_V1", {
        "COCO_V1": ("ssd300_vgg16_coco-b556d3b4.pth", 91, None)}, "COCO"),
    "SSDLite320_MobileNet_V3_Large_Weights": _entries("SSDLite320_MobileNet_V3_Large_Weights", "COCO_V1", {
        "COCO_V1": ("ssdlite320_mobilenet_v3_large_coco-a79551df.pth", 91, None)}, "COCO"),
    "FCOS_ResNet50_FPN_Weights": _entries("FCOS_ResNet50_FPN_Weights", "COCO_V1", {
        "COCO_V1": ("fcos_resnet50_fpn_coco-99b0c9b7.pth", 91, None)}, "COCO"),
    "MaskRCNN_ResNet50_FPN_Weights": _entries("MaskRCNN_ResNet50_FPN_Weights", "COCO_V1", {
        "COCO_V1": ("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", 91, 0.0)}, "COCO"),
    "MaskRCNN_ResNet50_FPN_V2_Weights": _entries("MaskRCNN_ResNet50_FPN_V2_Weights", "COCO_V1", {
        "COCO_V1": ("maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", 91, None)}, "COCO"),
    "ResNet18_Weights": _entries("ResNet18_Weights", "IMAGENET1K_V1", {
        "IMAGENET1K_V1": ("resnet18-f37072fd.pth", 1000, None)}, "ImageNet-1K"),
    "ResNet50_Weights": _entries("ResNet50_Weights", "IMAGENET1K_V2", {
        "IMAGENET1K_V1": ("resnet50-0676ba61.pth", 1000, None),
        "IMAGENET1K_V2": ("resnet50-11ad3fa6.pth", 1000, None)}, "ImageNet-1K"),
    "MobileNet_V3_Large_Weights": _entries("MobileNet_V3_Large_Weights", "IMAGENET1K_V2", {
        "IMAGENET1K_V1": ("mobilenet_v3_large-8738ca79.pth", 1000, None),
        "IMAGENET1K_V2": ("mobilenet_v3_large-5c1a4163.pth", 1000, None)}, "ImageNet-1K"),
    "VGG16_Weights": _entries("VGG16_Weights", "IMAGENET1K_V1", {
        "IMAGENET1K_V1": ("vgg16-397923af.pth", 1000, None),
        "IMAGENET1K_FEATURES": ("vgg16_features-amdegroot-88682ab5.pth", None, None)}, "ImageNet-1K"),
    **{f"EfficientNet_B{b}_Weights": _entries(f"EfficientNet_B{b}_Weights", default, {
        name: (file, 1000, None) for name, file in files.items()}, "ImageNet-1K") for b, default, files in (
        (0, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b0_rwightman-7f5810bc.pth"}),
        (1, "IMAGENET1K_V2", {"IMAGENET1K_V1": "efficientnet_b1_rwightman-bac287d4.pth",
                              "IMAGENET1K_V2": "efficientnet_b1-c27df63c.pth"}),
        (2, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b2_rwightman-c35c1473.pth"}),
        (3, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b3_rwightman-b3899882.pth"}),
        (4, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b4_rwightman-23ab8bcd.pth"}),
        (5, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b5_lukemelas-1a07897c.pth"}),
        (6, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b6_lukemelas-24a108a5.pth"}),
        (7, "IMAGENET1K_V1", {"IMAGENET1K_V1": "efficientnet_b7_lukemelas-c5b4e57e.pth"}))},
}


def _torchvision_meta(enum: str, name: str) -> dict | None:
    try:
        from torchvision.models import get_weight
    except ImportError:
        return None
    try:
        return dict(get_weight(f"{enum}.{name}").meta)
    except (ValueError, KeyError, AttributeError):
        return None


def _choices(enum: str | None) -> str:
    if enum is None:
        return "a path to a .pth file or a state dict (this builder has no published weights)"
    names = sorted(WEIGHTS[enum])
    return (f"one of {names} (or '{enum}.<name>', or the torchvision enum member), a path to a .pth file, or a "
            f"state dict")


def _looks_like_path(text: str) -> bool:
    return text.endswith((".pth", ".pt", ".ckpt", ".bin")) or os.sep in text or "/" in text or Path(text).is_file()


def resolve_weights(value: Any, enum: str | None, what: str = "weights") -> Weights | LocalWeights | None:
    """Normalise a ``weights=`` / ``weights_backbone=`` argument for a builder whose torchvision enum is ``enum``
    (None: no published weights). Returns None, a :class:`Weights` (published file) or a :class:`LocalWeights`."""
    if value is None:
        return None
    if enum is not None and enum not in WEIGHTS:
        raise KeyError(f"unknown weights enum {enum!r}")
    if isinstance(value, (Weights, LocalWeights)):
        if isinstance(value, Weights) and value.enum != enum:
            raise ValueError(f"{what}: expected {_choices(enum)}, got {value.key}")
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
            raise TypeError(f"{what}: a state dict must map names to tensors")
        return LocalWeights(value)
    if isinstance(value, os.PathLike):
        return LocalWeights(Path(value))
    if isinstance(value, str):
        enum_name, dot, member = value.rpartition(".")
        if dot and enum_name in WEIGHTS:
            if enum_name != enum:
                raise ValueError(f"{what}: {value!r} belongs to {enum_name}; expected {_choices(enum)}")
            value = member
        if enum is not None and value in WEIGHTS[enum]:
            return WEIGHTS[enum][value]
        if _looks_like_path(value):
            return LocalWeights(Path(value))
        raise ValueError(f"{what}: unknown weights {value!r}; expected {_choices(enum)}")
    # A torchvision weight enum member (duck-typed: torchvision is not imported here).
    enum_name = type(value).__name__
    member = getattr(value, "name", None)
    if isinstance(member, str) and hasattr(value, "url") and hasattr(value, "meta"):
        if enum_name != enum:
            raise ValueError(f"{what}: {enum_name}.{member} does not fit this builder; expected {_choices(enum)}")
        if member in WEIGHTS[enum]:
            return WEIGHTS[enum][member]
        file = str(value.url).rsplit("/", 1)[-1]
        categories = value.meta.get("categories")
        return Weights(enum, member, file, len(categories) if categories else None, None,
                       _categories=tuple(categories) if categories else None)
    raise TypeError(f"{what}: expected {_choices(enum)}, got {type(value).__name__}")


def download_weights(weights: Weights | str | Any, progress: bool = True) -> Path:
    """Explicitly fetch published weights into the torch hub cache (the opt-in for network access); returns the
    cached path. ``weights`` is a :class:`Weights`, a torchvision enum member or ``"<Enum>.<NAME>"``."""
    if isinstance(weights, str):
        enum_name, _, member = weights.rpartition(".")
        if enum_name not in WEIGHTS or member not in WEIGHTS[enum_name]:
            raise ValueError(f"unknown weights {weights!r}; expected '<Enum>.<NAME>' with Enum one of "
                             f"{sorted(WEIGHTS)}")
        weights = WEIGHTS[enum_name][member]
    elif not isinstance(weights, Weights):
        weights = resolve_weights(weights, type(weights).__name__)
    return weights.ensure_cached(progress, download=True)


def _download(weights: Weights, path: Path, progress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # download_url_to_file writes to a temporary file and moves it into place only when complete and hash-checked.
    torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=weights.hash_prefix or None, progress=progress)


_VERIFIED: dict[tuple[str, int, int], bool] = {}


def _check_hash(path: Path, prefix: str, key: str) -> None:
    if not prefix:
        return
    stat = path.stat()
    token = (str(path), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(token):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(prefix):
        raise WeightsHashError(f"{key}: {path} has SHA-256 {actual[:16]}..., but its name promises a hash starting "
                               f"with {prefix!r} (truncated or foreign file): delete it and download it again")
    _VERIFIED[token] = True


def _load_state_dict_file(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a torch state dict ({exc})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]  # a fastdet training checkpoint
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


# --------------------------------------------------------------------------------------------------------------------
# builder conventions
# --------------------------------------------------------------------------------------------------------------------


def resolve_norm_layer(norm_layer: Any, pretrained: bool) -> Callable[[int], nn.Module]:
    """``None`` -> ``FrozenBatchNorm2d`` when pretrained else ``BatchNorm2d`` (torchvision's rule); the strings
    ``"FrozenBatchNorm2d"``/``"BatchNorm2d"`` (what a checkpoint's model description can record) or a class."""
    from fastdet.models.layers import FrozenBatchNorm2d

    if norm_layer is None:
        return FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if isinstance(norm_layer, str):
        named = {"FrozenBatchNorm2d": FrozenBatchNorm2d, "BatchNorm2d": nn.BatchNorm2d}
        if norm_layer not in named:
            raise ValueError(f"norm_layer: expected one of {sorted(named)} or a module class, got {norm_layer!r}")
        return named[norm_layer]
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a module class or name, got {type(norm_layer).__name__}")
    return norm_layer


def norm_layer_name(norm_layer: Any) -> str | None:
    """The string form of a norm layer :func:`resolve_norm_layer` accepts, or None for other layers."""
    name = getattr(norm_layer, "__name__", None)
    return name if name in ("FrozenBatchNorm2d", "BatchNorm2d") else None


@dataclass
class BuildPlan:
    """What a builder needs after applying torchvision's rules (see the module docstring)."""

    weights: Weights | LocalWeights | None
    weights_backbone: Weights | LocalWeights | None
    num_classes: int
    trainable_backbone_layers: int
    norm_layer: Callable[[int], nn.Module]

    @property
    def pretrained(self) -> bool:
        return self.weights is not None or self.weights_backbone is not None

    def backbone_state_dict(self, progress: bool = True) -> Mapping[str, torch.Tensor] | None:
        """The backbone's (classifier) state dict to load before it is cut into a feature extractor, or None."""
        if self.weights_backbone is None:
            return None
        return self.weights_backbone.get_state_dict(progress)

    def load_into(self, model: nn.Module, progress: bool = True, ignore_prefixes: tuple[str, ...] = ()) -> nn.Module:
        """Load ``weights`` strictly into ``model`` and apply the checkpoint's frozen-BN eps override. Keys starting
        with one of ``ignore_prefixes`` are dropped first (e.g. ``("rpn.",)``: a Faster R-CNN checkpoint loaded into a
        detector without an RPN); every other key must still match."""
        if self.weights is not None:
            state = self.weights.get_state_dict(progress)
            if ignore_prefixes:
                state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
            model.load_state_dict(state)
            if self.weights.frozen_bn_eps is not None:
                set_frozen_bn_eps(model, self.weights.frozen_bn_eps)
        return model


def set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    """Set ``eps`` of every ``FrozenBatchNorm2d`` of ``model`` (torchvision's ``overwrite_eps``)."""
    from fastdet.models.layers import FrozenBatchNorm2d

    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


def plan_build(weights_enum: str | None, backbone_enum: str | None, *, weights: Any, weights_backbone: Any,
               num_classes: int | None, trainable_backbone_layers: int | None, max_trainable_layers: int,
               default_trainable_layers: int, norm_layer: Any = None, default_num_classes: int = 91,
               progress: bool = True) -> BuildPlan:
    """torchvision's builder rules (see the module docstring). The files are checked (present, right hash) here,
    before any model is built, so a missing one fails at once."""
    resolved = resolve_weights(weights, weights_enum, "weights")
    resolved_backbone = resolve_weights(weights_backbone, backbone_enum, "weights_backbone")
    if resolved is not None:
        resolved_backbone = None  # the full checkpoint overwrites the backbone anyway (torchvision's rule)
        expected = resolved.meta["num_classes"]
        if expected is not None:
            if num_classes is not None and num_classes != expected:
                raise ValueError(
                    f"num_classes={num_classes!r} conflicts with {resolved.key}, which has {expected} classes. To "
                    f"fine-tune on other classes, build with the weights and call model.replace_class_heads("
                    f"{num_classes!r}), or use fastdet.models.weights.finetune_model(builder, {num_classes!r}, "
                    f"weights=...)")
            num_classes = expected
        resolved.ensure_cached(progress)
    elif resolved_backbone is not None:
        resolved_backbone.ensure_cached(progress)
    if num_classes is None:
        num_classes = default_num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    pretrained = resolved is not None or resolved_backbone is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_trainable_layers if pretrained else max_trainable_layers
    if (isinstance(trainable_backbone_layers, bool) or not isinstance(trainable_backbone_layers, int)
            or not 0 <= trainable_backbone_layers <= max_trainable_layers):
        raise ValueError(f"trainable_backbone_layers must be an int in [0, {max_trainable_layers}], got "
                         f"{trainable_backbone_layers!r}")
    return BuildPlan(resolved, resolved_backbone, num_classes, trainable_backbone_layers,
                     resolve_norm_layer(norm_layer, pretrained))


def rebuild_kwargs(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Builder keyword arguments (beyond ``kwargs``, JSON-friendly) that rebuild ``model``'s architecture without any
    weights file, e.g. from a training checkpoint: ``weights_backbone=None`` (the checkpoint holds every weight),
    plus the choices the builder derived from pretrained weights: ``norm_layer="FrozenBatchNorm2d"`` when the model
    holds frozen batch norms, and the MobileNet tail width of SSDlite (``reduced_tail``)."""
    from fastdet.models.layers import FrozenBatchNorm2d

    extra: dict[str, Any] = {"weights_backbone": None}
    if "norm_layer" not in kwargs and any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()):
        extra["norm_layer"] = "FrozenBatchNorm2d"
    reduced_tail = getattr(getattr(model, "backbone", None), "reduced_tail", None)
    if reduced_tail is not None and "reduced_tail" not in kwargs:
        extra["reduced_tail"] = bool(reduced_tail)
    return extra


def finetune_model(builder: Callable[..., nn.Module] | str, num_classes: int, *, weights: Any = "DEFAULT",
                   weights_num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The fine-tuning workflow in one call: build ``builder`` (a function or a name in :mod:`fastdet.models`) with
    pretrained ``weights`` (their own class count: the published metadata's, else ``weights_num_classes``, else 91),
    then replace the class-dependent heads with fresh ones for ``num_classes`` (background included) via
    ``model.replace_class_heads``; everything else stays pretrained."""
    if isinstance(builder, str):
        import fastdet.models as models

        if builder not in getattr(models, "DETECTOR_BUILDERS", ()):
            raise ValueError(f"unknown detector builder {builder!r}")
        builder = getattr(models, builder)
    if weights_num_classes is not None:
        kwargs["num_classes"] = weights_num_classes
    model = builder(weights=weights, **kwargs)
    if getattr(model, "num_classes", None) != num_classes:
        replace = getattr(model, "replace_class_heads", None)
        if replace is None:
            raise TypeError(f"{type(model).__name__} cannot replace its class heads")
        replace(num_classes)
    return model
