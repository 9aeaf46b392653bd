"""External region proposals and the detector base that consumes them (R-CNN, Fast R-CNN, SPP-Net).

Before the RPN, detectors classified and refined *external* proposals: boxes from selective search, from a file
computed once for the dataset, or from another model. This module holds that plumbing once:

* proposal sources: :class:`SelectiveSearchProposals` (the default: ``fastdet.ops.selective_search`` in fast mode,
  capped at ``max_proposals_train`` / ``max_proposals_test`` boxes), :class:`ProposalTable` (precomputed boxes per
  ``image_id``, e.g. from :func:`load_proposals`) or any callable ``image -> Tensor[K, 4]``;
* :func:`check_proposals`: validation of per-image proposal lists with errors naming the bad entry;
  :func:`pad_proposals`: a list to ``boxes [B, P, 4]`` and ``valid [B, P]`` (``P = max(1, max K_i)``; padding slots
  hold zero boxes and ``valid = False``, the layout of :class:`fastdet.models.targets.PaddedTargets`);
* :class:`ProposalDetector`: transform -> backbone -> :class:`fastdet.models.heads.roi_heads.RoIHeads` on the given
  (or generated) proposals, torchvision's detection contract. :class:`fastdet.models.fast_rcnn.FastRCNN` and
  :class:`fastdet.models.sppnet.SPPNet` are thin subclasses choosing the backbone and the RoI pooling.

Proposals are ``(x1, y1, x2, y2)`` in the original image's pixels, like targets, and are rescaled with the image by
the detector's transform and clipped to it. In training the ground-truth boxes join the proposals before sampling
(:meth:`RoIHeads.select_training_samples`, as Fast/Faster R-CNN).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.heads.roi_heads import Detections, RoIHeads
from fastdet.models.heads.rpn import Proposals
from fastdet.models.postprocess import clip_boxes_to_images, image_sizes_tensor, split_padded
from fastdet.models.targets import pad_box_lists, pad_targets
from fastdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, batched_postprocess_boxes
from fastdet.ops import selective_search

__all__ = ["ExternalProposals", "ProposalDetector", "ProposalTable", "SelectiveSearchProposals", "check_proposals",
           "load_proposals", "make_proposal_source", "pad_proposals", "save_proposals"]

def _positive_int_or_none(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class SelectiveSearchProposals(nn.Module):
    """``fastdet.ops.selective_search`` as a proposal source: ``source(image) -> Tensor[K, 4]`` float32 on the image's
    device (``x2``, ``y2`` exclusive: the whole image is ``(0, 0, W, H)``).

    A module without parameters, so the detector's ``train()`` / ``eval()`` switch the cap: at most
    ``max_proposals_train`` boxes (the best ranked) in training mode and ``max_proposals_test`` in evaluation
    (R-CNN / Fast R-CNN used ~2,000 selective-search boxes per image). The search runs on the CPU (the image is
    copied there when needed), its strategies in parallel on torch's intra-op threads.

    Args:
        mode (str): ``"single"``, ``"fast"`` (default, the paper's fast mode) or ``"quality"``.
        max_proposals_train, max_proposals_test (int or None): caps (None = every box).
        max_side (int or None): an image whose longer side exceeds this is downscaled (bilinear) for the search and
            the boxes scaled back (the search's cost grows with the pixel count; the papers worked at about 500 px;
            the op accepts at most 2048). None searches at full size.
        seed (int): the ranking's random draw (the same image always gives the same proposals).
        **options: other :func:`fastdet.ops.selective_search` keywords (``min_size``, ``sigma``, ``strategies``).
    """

    def __init__(self, mode: str = "fast", max_proposals_train: int | None = 2000,
                 max_proposals_test: int | None = 1000, max_side: int | None = 500, seed: int = 0, **options):
        super().__init__()
        self.mode = mode
        self.max_proposals_train = _positive_int_or_none(max_proposals_train, "max_proposals_train")
        self.max_proposals_test = _positive_int_or_none(max_proposals_test, "max_proposals_test")
        self.max_side = _positive_int_or_none(max_side, "max_side")
        self.seed = seed
        self.options = dict(options)
        # A bad mode or option fails here, not at the first training step.
        selective_search(torch.zeros(3, 2, 2, device="cpu"), mode, max_proposals=1, seed=seed, **self.options)

    def forward(self, image: Tensor) -> Tensor:
        return self.propose(image, self.max_proposals_train if self.training else self.max_proposals_test)

    def propose(self, image: Tensor, max_proposals: int | None) -> Tensor:
        """Proposals of one ``Tensor[3, H, W]`` image (float in [0, 1] or uint8), at most ``max_proposals``."""
        height, width = image.shape[-2:]
        search_image = image.detach().cpu()
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            search_image = F.interpolate(search_image[None].float(), size=size, mode="bilinear",
                                         align_corners=False)[0]
            if not image.is_floating_point():
                search_image = search_image.round().clamp(0, 255).to(image.dtype)
        boxes = selective_search(search_image, self.mode, max_proposals=max_proposals, seed=self.seed,
                                 **self.options)
        if tuple(search_image.shape[-2:]) != (height, width):
            boxes = boxes * torch.tensor([width / search_image.shape[-1], height / search_image.shape[-2]] * 2)
        return boxes.to(image.device)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, max_proposals_train={self.max_proposals_train}, "
                f"max_proposals_test={self.max_proposals_test}, max_side={self.max_side}, seed={self.seed}")


class ProposalTable:
    """Precomputed proposals by image id: ``table.lookup(image_id) -> Tensor[K, 4]`` (xyxy, original pixels).

    The detector finds an image's id in ``forward(..., image_ids=...)`` or in its target's ``"image_id"``; an image
    without an entry raises a ``KeyError`` naming it. The boxes must match the image as the model sees it: to train
    with augmentation that moves pixels (flips, crops), attach them to the targets ahead of it instead
    (:class:`fastdet.data.AttachProposals`; the detectors use the targets' ``"proposals"`` first).
    """

    def __init__(self, proposals: Mapping[int, Tensor]):
        self.proposals = {int(k): _as_box_tensor(v, f"proposals[{k!r}]") for k, v in proposals.items()}

    def __len__(self) -> int:
        return len(self.proposals)

    def lookup(self, image_id: int) -> Tensor:
        try:
            return self.proposals[int(image_id)]
        except KeyError:
            raise KeyError(f"no proposals for image_id {int(image_id)} in the proposal table "
                           f"({len(self.proposals)} images)") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.proposals)} images)"


def _as_box_tensor(value, name: str) -> Tensor:
    boxes = torch.as_tensor(value, dtype=torch.float32)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [K, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return boxes


def load_proposals(path: str | os.PathLike) -> dict[int, Tensor]:
    """Read a proposals file: ``{image_id: Tensor[K, 4] float32}`` (xyxy, original image pixels).

    Formats (by extension):

    * ``.json``: an object ``{"<image_id>": [[x1, y1, x2, y2], ...], ...}`` or a list of
      ``{"image_id": int, "boxes": [[x1, y1, x2, y2], ...]}`` records;
    * ``.pt`` / ``.pth``: a ``torch.save``'d dict ``{image_id: Tensor[K, 4]}`` (read with ``weights_only=True``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the bad entry otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proposals file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"proposals file {path} is not valid JSON: {exc}") from None
        if isinstance(data, list):
            entries = {}
            for i, record in enumerate(data):
                if not isinstance(record, dict) or "image_id" not in record or "boxes" not in record:
                    raise ValueError(f"proposals file {path}: record {i} must be an object with 'image_id' and "
                                     f"'boxes'")
                entries[record["image_id"]] = record["boxes"]
            data = entries
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"proposals file {path}: unknown format {suffix!r} (expected .json, .pt or .pth)")
    if not isinstance(data, Mapping):
        raise ValueError(f"proposals file {path} must map image ids to boxes, got {type(data).__name__}")
    out = {}
    for key, boxes in data.items():
        try:
            image_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"proposals file {path}: key {key!r} is not an integer image id") from None
        if image_id in out:
            raise ValueError(f"proposals file {path}: image id {image_id} appears more than once")
        out[image_id] = _as_box_tensor(boxes, f"proposals file {path}: entry {key!r}")
    return out


def save_proposals(path: str | os.PathLike, proposals: Mapping[int, Tensor]) -> None:
    """Write ``{image_id: Tensor[K, 4]}`` in the format :func:`load_proposals` reads (by extension: ``.json`` or
    ``.pt``/``.pth``)."""
    path = Path(path)
    boxes = {int(k): _as_box_tensor(v, f"proposals[{k!r}]").cpu() for k, v in proposals.items()}
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({str(k): v.tolist() for k, v in boxes.items()}))
    elif path.suffix.lower() in (".pt", ".pth"):
        torch.save(boxes, path)
    else:
        raise ValueError(f"proposals file {path}: unknown format {path.suffix!r} (expected .json, .pt or .pth)")


def make_proposal_source(source, max_proposals_train: int = 2000, max_proposals_test: int = 1000):
    """What a detector's ``proposal_generator`` argument may be, normalised: None -> :class:`SelectiveSearchProposals`
    (fast mode, the given caps); a path (str / PathLike) -> :class:`ProposalTable` of :func:`load_proposals`; a
    mapping ``{image_id: boxes}`` -> :class:`ProposalTable`; a :class:`ProposalTable` or callable as is."""
    if source is None:
        return SelectiveSearchProposals("fast", max_proposals_train, max_proposals_test)
    if isinstance(source, (str, os.PathLike)):
        return ProposalTable(load_proposals(source))
    if isinstance(source, Mapping):
        return ProposalTable(source)
    if isinstance(source, ProposalTable) or callable(source):
        return source
    raise TypeError(f"proposal_generator must be None, a callable image -> boxes, a {{image_id: boxes}} mapping or a "
                    f"proposals file path, got {type(source).__name__}")


def check_proposals(proposals, images: Sequence[Tensor]) -> None:
    """Check per-image proposals: a list with one float ``Tensor[K_i, 4]`` (``K_i = 0`` allowed) per image, on the
    images' device, finite, with ``x1 <= x2`` and ``y1 <= y2``. Raises ``TypeError`` / ``ValueError`` naming the bad
    entry (one host read for the whole batch's value checks)."""
    if isinstance(proposals, Tensor) or not isinstance(proposals, Sequence):
        raise TypeError(f"proposals must be a list of Tensor[K, 4] (one per image), got {type(proposals).__name__}")
    if len(proposals) != len(images):
        raise ValueError(f"proposals must have one Tensor[K, 4] per image: got {len(proposals)} for {len(images)} "
                         f"images")
    flags = []
    for i, boxes in enumerate(proposals):
        if isinstance(boxes, Mapping):
            raise TypeError(f"proposals[{i}] is a dict: targets must be passed by keyword, model(images, "
                            f"targets=targets); the second positional argument of this detector is the proposals")
        if not isinstance(boxes, Tensor):
            raise TypeError(f"proposals[{i}] must be a Tensor[K, 4], got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"proposals[{i}] must have shape [K, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise TypeError(f"proposals[{i}] must be a floating-point tensor, got {boxes.dtype}")
        if boxes.device != images[0].device:
            raise ValueError(f"proposals[{i}] is on {boxes.device}, the images on {images[0].device}")
        if boxes.shape[0]:
            flags.append((i, torch.stack([~torch.isfinite(boxes).all(), (boxes[:, 2:] < boxes[:, :2]).any()])))
    if not flags:
        return
    values = torch.stack([f for _, f in flags]).tolist()
    for (i, _), (non_finite, flipped) in zip(flags, values):
        if non_finite:
            raise ValueError(f"proposals[{i}] contains NaN or infinite coordinates")
        if flipped:
            raise ValueError(f"proposals[{i}] has a box with x2 < x1 or y2 < y1 (boxes are x1, y1, x2, y2)")


def pad_proposals(proposals: Sequence[Tensor], max_per_image: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-image proposals (each cut to its first ``max_per_image``) -> ``(boxes [B, P, 4] float32, valid [B, P])``,
    the padding of the module docstring."""
    if max_per_image is not None:
        proposals = [b[:max_per_image] for b in proposals]
    boxes = [b.detach().float() for b in proposals]
    padded, _, valid = pad_box_lists(boxes, [b.new_zeros(b.shape[0], dtype=torch.int64) for b in boxes])
    return padded, valid


class ExternalProposals:
    """What the detectors on external proposals (R-CNN, Fast R-CNN, SPP-Net) share about their
    ``proposal_generator``: asking it for a batch's proposals, and saying whether it needs the images' ids.

    A mixin for an ``nn.Module`` with a ``proposal_generator`` attribute (see :func:`make_proposal_source`).
    """

    proposal_generator: object

    @property
    def needs_image_ids(self) -> bool:
        """True when the proposals come from a :class:`ProposalTable`: ``forward`` then needs ``image_ids=[...]`` (or
        targets with ``"image_id"``). :func:`fastdet.eval.collect_detections` passes the ids when this is true."""
        return isinstance(self.proposal_generator, ProposalTable)

    def replace_proposal_generator(self, source) -> None:
        """Take proposals from ``source`` from now on: a callable ``image -> Tensor[K, 4]``, a proposals file, a
        ``{image_id: boxes}`` mapping or a :class:`ProposalTable` (see :func:`make_proposal_source`; ``None`` is not
        accepted here: the default search's settings belong to the builder)."""
        if source is None:
            raise TypeError("proposal_generator must be a callable, a proposals file, a mapping or a ProposalTable, "
                            "got None")
        source = make_proposal_source(source)
        if isinstance(self, nn.Module) and "proposal_generator" in self._modules and not isinstance(source, nn.Module):
            del self._modules["proposal_generator"]  # a module slot cannot hold a table or a plain function
        self.proposal_generator = source

    def generate_proposals(self, images: Sequence[Tensor], targets=None, image_ids=None) -> list[Tensor]:
        """The proposals of each image, checked as user proposals are: the targets' ``"proposals"`` when every target
        has them (precomputed boxes moved with the image by the data transforms, see
        :class:`fastdet.data.AttachProposals`), else the ``proposal_generator``'s (one call per image: selective
        search works on one image at a time). A table's boxes and the targets' are cut to the mode's cap."""
        source = self.proposal_generator
        cap = getattr(self, "max_proposals_train" if getattr(self, "training", False) else "max_proposals_test", None)
        if targets is not None and targets and all(isinstance(t.get("proposals"), Tensor) for t in targets):
            proposals = [t["proposals"][:cap].to(images[0].device, torch.float32) for t in targets]
        elif isinstance(source, ProposalTable):
            if image_ids is None:
                if targets is None or not all("image_id" in t for t in targets):
                    raise ValueError("a proposal table needs the images' ids: pass image_ids=[...] (or targets with "
                                     "'image_id'), or pass proposals= explicitly")
                image_ids = [int(torch.as_tensor(t["image_id"]).reshape(-1)[0]) for t in targets]
            if len(image_ids) != len(images):
                raise ValueError(f"image_ids must have one id per image: got {len(image_ids)} for {len(images)}")
            # a file holds the best-ranked boxes first: the mode's cap applies to it as to the built-in search
            proposals = [source.lookup(i)[:cap].to(images[0].device) for i in image_ids]
        else:
            proposals = [source(image) for image in images]
        check_proposals(proposals, images)
        return proposals


class ProposalDetector(ExternalProposals, nn.Module):
    """Transform -> backbone -> :class:`RoIHeads` on external proposals (see the module docstring).

    ``model(images, proposals=None, targets=None, *, image_ids=None)``: ``images`` a list of float ``Tensor[3, H, W]``
    in 0..1; ``proposals`` a list of ``Tensor[K_i, 4]`` (xyxy, original image pixels) or None to ask the
    ``proposal_generator``; ``targets`` (training, by keyword: the second positional argument is the proposals) as
    :class:`fastdet.models.faster_rcnn.FasterRCNN`'s; ``image_ids`` for a :class:`ProposalTable` (else read from the
    targets' ``"image_id"``). Training returns ``{"loss_classifier", "loss_box_reg"}``; evaluation one
    ``{"boxes", "labels", "scores"}`` dict per image in original pixels.

    Args:
        backbone (nn.Module): returns an OrderedDict of feature maps (or one tensor, keyed ``"0"``), has
            ``out_channels``.
        box_roi_pool, box_head, box_predictor (nn.Module): the box branch (see :func:`box_branch`).
        proposal_generator: see :func:`make_proposal_source` (default selective search, fast mode).
        max_proposals_train, max_proposals_test (int): boxes per image taken from the default generator or a
            proposal table in training / evaluation (the best-ranked first).
        min_size, max_size, image_mean, image_std, size_divisible, fixed_size: :class:`DetectionTransform`.
        box_*: :class:`RoIHeads` (torchvision's Faster R-CNN defaults).
        nms_method (str): the final NMS, ``"hard"`` (default), ``"soft"`` or ``"soft_linear"`` (as Faster R-CNN's).
    """

    def __init__(self, backbone: nn.Module, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 proposal_generator=None, max_proposals_train: int = 2000, max_proposals_test: int = 1000,
                 min_size=800, max_size: int = 1333, image_mean=None, image_std=None, size_divisible: int = 32,
                 fixed_size=None, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                 box_detections_per_img: int = 100, box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25, bbox_reg_weights=None,
                 box_pre_nms_top_k: int | None = None, nms_method: str = "hard"):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an 'out_channels' attribute (channels of its feature maps)")
        self.num_classes = box_predictor.cls_score.out_features
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN, image_std or IMAGENET_STD,
                                            size_divisible=size_divisible, fixed_size=fixed_size)
        self.backbone = backbone
        self.roi_heads = RoIHeads(
            box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
            box_positive_fraction, bbox_reg_weights, box_score_thresh, box_nms_thresh, box_detections_per_img,
            box_pre_nms_top_k, nms_method)
        self.max_proposals_train = _positive_int_or_none(max_proposals_train, "max_proposals_train")
        self.max_proposals_test = _positive_int_or_none(max_proposals_test, "max_proposals_test")
        self.proposal_generator = make_proposal_source(proposal_generator, max_proposals_train, max_proposals_test)

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: a fresh box predictor for ``num_classes`` (background included); the rest stays."""
        self.roi_heads.replace_box_predictor(num_classes)
        self.num_classes = num_classes

    def _features(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)
        return {"0": features} if isinstance(features, Tensor) else features

    def forward(self, images: list[Tensor], proposals: list[Tensor] | None = None,
                targets: list[dict[str, Tensor]] | None = None, *, image_ids: Sequence[int] | None = None):
        if proposals is not None and not isinstance(proposals, Tensor) and isinstance(proposals, Sequence) and \
                proposals and isinstance(proposals[0], Mapping) and targets is None:
            raise TypeError("the second positional argument of this detector is the proposals, got a list of dicts: "
                            "pass targets by keyword, model(images, targets=targets)")
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        if proposals is None:
            proposals = self.generate_proposals(images, targets, image_ids)
        else:
            check_proposals(proposals, images)
        if self.training:
            return self.compute_losses(images, proposals, targets)
        detections = self.detect(images, proposals)
        return split_padded(detections.num_detections, boxes=detections.boxes, labels=detections.labels,
                            scores=detections.scores)

    def _padded_proposals(self, proposals: Sequence[Tensor], original_sizes, image_sizes) -> Proposals:
        """Per-image proposals -> padded :class:`Proposals` in resized-image pixels (one batched rescale and clip)."""
        device = proposals[0].device
        padded, valid = pad_proposals(proposals)
        padded = batched_postprocess_boxes(padded, original_sizes, image_sizes)  # original -> resized pixels
        padded = clip_boxes_to_images(padded, image_sizes_tensor(image_sizes, device))
        return Proposals(padded, valid.to(padded.dtype), valid)

    def compute_losses(self, images: list[Tensor], proposals: list[Tensor],
                       targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training losses for a batch (inputs are assumed checked, as by :meth:`forward`)."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, resized_targets = self.transform(images, targets)
        padded_targets = pad_targets(resized_targets, batch.tensors.device)
        rois = self._padded_proposals(proposals, original_sizes, batch.image_sizes)
        features = self._features(batch.tensors)
        _, losses = self.roi_heads(features, rois, batch.image_sizes, padded_targets)
        return losses

    def detect(self, images: list[Tensor], proposals: list[Tensor]) -> Detections:
        """Padded ``[B, K]`` detections in original-image pixels (no host synchronisation after the transform)."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = self.transform(images, None)
        rois = self._padded_proposals(proposals, original_sizes, batch.image_sizes)
        features = self._features(batch.tensors)
        detections, _ = self.roi_heads(features, rois, batch.image_sizes)
        boxes = batched_postprocess_boxes(detections.boxes, batch.image_sizes, original_sizes)
        return detections._replace(boxes=boxes)

