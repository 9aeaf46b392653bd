"""R-CNN (Girshick, Donahue, Darrell & Malik, "Rich feature hierarchies for accurate object detection and semantic
segmentation", CVPR 2014): region proposals -> each region warped to a fixed size -> CNN features -> per-class linear
SVMs and class-specific box regression -> per-class NMS.

The pipeline, and how each step is done here:

1. **Proposals**: :class:`fastdet.models.proposals.SelectiveSearchProposals` (selective search, fast mode, the paper's
   setting), at most ``max_proposals_train`` (2000) / ``max_proposals_test`` (1000) per image; or proposals given to
   ``forward(..., proposals=...)``, or any ``proposal_generator(image) -> Tensor[K, 4]``, or precomputed boxes by
   image id (a proposals file or mapping: :class:`fastdet.models.proposals.ProposalTable`).
2. **Warping**: every region is dilated so that, once warped, ``context_padding`` pixels of image context surround it
   (the paper: 16 pixels at 227 x 227), then warped anisotropically to ``warp_size x warp_size`` by one
   :func:`fastdet.ops.roi_align` call over the normalised batch for all regions of all images (bilinear sampling,
   ``sampling_ratio`` samples per output pixel and axis). Context outside the image reads 0 in the normalised image,
   i.e. the image mean: the paper's mean padding (within a pixel of the border, the edge value).
3. **Features**: a CNN on the warped regions, globally pooled (``backbone(crops [N, 3, S, S]) -> [N, D]``, e.g. the
   ResNet of the builders with ``fc`` an identity or a Linear + ReLU ``representation_size`` layer). The SVMs and
   box regressors read them scaled to L2 norm ``feature_norm`` (the paper too rescales its features for the SVMs).
4. **Classification**: per-class linear SVMs (``svm``: ``D -> num_classes - 1``) trained with the hinge loss. As the
   paper, positives of class c are the ground-truth boxes of class c, negatives the regions whose IoU with every
   ground-truth box of class c is below ``svm_negative_iou_thresh`` (0.3), and training uses hard negatives: of the
   negatives of class c in the batch, the ``svm_hard_negatives`` with the highest SVM scores (the paper's mining keeps
   the negatives that violate the margin; the non-violators would add 0 to the hinge loss anyway). See
   :func:`svm_hinge_loss`.
5. **Box regression**: class-specific linear regression (``bbox_pred``: ``D -> 4 (num_classes - 1)``) of the paper's
   targets ``t = ((Gx - Px) / Pw, (Gy - Py) / Ph, log(Gw / Pw), log(Gh / Ph))`` (:func:`fastdet.ops.box_encode`, unit
   weights), trained on the (proposal, ground truth) pairs with IoU > ``bbox_reg_iou_thresh`` (0.6) with a squared
   loss plus a ridge penalty ``bbox_reg_l2 / 2 * ||W||^2`` (:func:`box_regression_loss`).
6. **Detection**: every proposal scored by every class's SVM, its box regressed for that class, clipped, then
   per-class greedy NMS at IoU ``nms_thresh`` (0.3, the paper's) through :func:`fastdet.ops.multiclass_nms`.
   Reported scores are ``sigmoid(SVM margin)``: monotone in the margin (so the ranking, hence the AP, is the SVM's),
   0.5 on the SVM's decision boundary, and in [0, 1] like the other detectors' scores so that score thresholds mean
   something in ``fastdet predict``; ``score_thresh`` applies to that value.

**Joint vs staged training.** The paper trains in three stages: fine-tune the CNN (softmax over N + 1 classes on warped
proposals, IoU >= 0.5 positive, 32 positives + 96 background per mini-batch), then fit the SVMs on the frozen
features, then the box regressors on the frozen features. Here one ``model(images, targets)`` step computes all three
losses on the same warped regions, and they are separable exactly as the stages are:

* ``loss_classifier``: the fine-tuning stage's cross-entropy (``cls_score``: ``D -> num_classes``; 0 = background)
  over a balanced sample per image (``batch_size_per_image`` regions, ``positive_fraction`` positive: 32 + 96 at the
  defaults; positives IoU >= ``fg_iou_thresh`` (0.5), background below ``bg_iou_thresh`` (0.5); the ground-truth
  boxes join the candidates as in the paper). This is the only loss whose gradient reaches the CNN.
* ``loss_svm`` and ``loss_box_reg`` see the features **detached**: their gradients reach only ``svm`` and
  ``bbox_pred``. So the SVMs and regressors always fit the current features (jointly in time, staged in the gradient
  path). Training with ``trainable_backbone_layers=0`` (or a model whose CNN is already fine-tuned) is the paper's
  second and third stages alone. ``cls_score`` is used only for fine-tuning; detection scores come from the SVMs.

The warped set of a training step is the balanced sample plus every ground-truth box (the SVM positives), so hard
negatives are mined among the sampled negatives of the batch, not over all proposals as the paper's cache does: that
keeps every step one fixed-size CNN batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.backbones.resnet import freeze_resnet_stages, resnet
from fastdet.models.heads.roi_heads import MIN_DETECTION_SIZE, Detections
from fastdet.models.matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, BalancedPositiveNegativeSampler, Matcher
from fastdet.models.postprocess import (
    clip_boxes_to_images,
    compact_mask,
    gather_rows,
    image_sizes_tensor,
    split_padded,
)
from fastdet.models.proposals import (
    ExternalProposals,
    SelectiveSearchProposals,
    check_proposals,
    make_proposal_source,
    pad_proposals,
)
from fastdet.models.targets import pad_targets
from fastdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform
from fastdet.models.weights import plan_build
from fastdet.ops import box_decode, box_encode, box_iou, multiclass_nms, roi_align

__all__ = ["RCNN", "box_regression_loss", "rcnn_resnet18", "rcnn_resnet50", "svm_hinge_loss", "warp_boxes"]

# The paper's box parameterisation has no weights (torchvision's Fast R-CNN uses (10, 10, 5, 5)).
PAPER_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def warp_boxes(images: Tensor, boxes: Tensor, warp_size: int, context_padding: float = 0.0,
               sampling_ratio: int = 2) -> Tensor:
    """Warp regions of a batch to ``warp_size x warp_size`` in one :func:`fastdet.ops.roi_align` call.

    Args:
        images (Tensor[B, C, H, W]): the (normalised) images.
        boxes (Tensor[B, P, 4]): xyxy regions per image, continuous pixel coordinates (pixel ``i`` spans
            ``[i, i + 1)``).
        warp_size (int): output side S.
        context_padding (float): pixels of context around the region in the warped output: the region is dilated
            about its centre by ``S / (S - 2 p)`` before warping (the paper: p = 16 at S = 227).
        sampling_ratio (int): bilinear samples per output pixel and axis (averaged).

    Returns:
        Tensor[B * P, C, S, S], image-major. Samples more than one pixel outside the image read 0 (nearer ones the
        edge pixel: :func:`fastdet.ops.roi_align`'s border rule).
    """
    B, P, _ = boxes.shape
    boxes = boxes.to(images.dtype)
    if context_padding > 0:
        factor = warp_size / (warp_size - 2.0 * context_padding)
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)
        boxes = torch.cat([centres - half, centres + half], dim=-1)
    batch_index = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(P)
    rois = torch.cat([batch_index[:, None], boxes.reshape(B * P, 4)], dim=1)
    return roi_align(images, rois, (warp_size, warp_size), 1.0, sampling_ratio, aligned=True)


def svm_hinge_loss(scores: Tensor, positive: Tensor, negative: Tensor, hard_negatives: int,
                   weight: Tensor | None = None, l2: float = 0.0) -> tuple[Tensor, Tensor]:
    """Hinge loss of per-class linear SVMs with hard negative mining over a batch of examples.

    Args:
        scores (Tensor[N, K]): SVM margins of N examples for K classes.
        positive, negative (Tensor[N, K] bool): which examples are positives / negative candidates of each class.
        hard_negatives (int): per class, the negative candidates with the highest scores that are kept (all when
            there are fewer).
        weight (Tensor[K, D], optional): the SVMs' weights, for the ridge term ``l2 / 2 * ||weight||^2``.
        l2 (float): ridge coefficient.

    Returns:
        ``(loss, hard)``: ``loss = (sum over positives of max(0, 1 - s) + sum over kept negatives of max(0, 1 + s)) /
        max(1, #positives + #kept negatives) + l2 / 2 * ||weight||^2``, and ``hard [N, K]`` the kept negatives.
    """
    N, K = scores.shape
    scores = scores.float()
    take = min(int(hard_negatives), N)
    hard = torch.zeros_like(negative)
    if take > 0 and N > 0:
        ranked = torch.where(negative, scores.detach(), float("-inf"))
        top_scores, top_index = ranked.topk(take, dim=0)  # [take, K]
        hard = hard.scatter(0, top_index, top_scores > float("-inf"))
    positive_terms = torch.where(positive, F.relu(1.0 - scores), 0.0)
    negative_terms = torch.where(hard, F.relu(1.0 + scores), 0.0)
    count = (positive.sum() + hard.sum()).clamp(min=1).float()
    loss = (positive_terms.sum() + negative_terms.sum()) / count
    if weight is not None and l2 > 0:
        loss = loss + 0.5 * l2 * weight.float().pow(2).sum()
    return loss, hard


def box_regression_loss(predictions: Tensor, targets: Tensor, selected: Tensor, weight: Tensor | None = None,
                        l2: float = 0.0) -> Tensor:
    """The paper's ridge regression of box targets: ``sum over selected rows of ||prediction - target||^2 /
    max(1, #selected) + l2 / 2 * ||weight||^2``.

    Args:
        predictions, targets (Tensor[N, 4]): predicted and target ``(tx, ty, tw, th)``.
        selected (Tensor[N] bool): the training pairs (others contribute nothing; their targets may be anything
            finite).
        weight (Tensor, optional), l2 (float): the regressors' weights and ridge coefficient.
    """
    squared = (predictions.float() - targets.float()).pow(2).sum(dim=-1)
    loss = torch.where(selected, squared, 0.0).sum() / selected.sum().clamp(min=1).float()
    if weight is not None and l2 > 0:
        loss = loss + 0.5 * l2 * weight.float().pow(2).sum()
    return loss


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_non_negative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class RCNN(ExternalProposals, nn.Module):
    """R-CNN: proposals -> warped regions -> CNN features -> per-class SVMs + box regression -> per-class NMS (see the
    module docstring for the pipeline and what is joint vs staged in training).

    ``model(images, targets=None, proposals=None, *, image_ids=None)``: ``images`` a list of float
    ``Tensor[3, H, W]`` in 0..1 (any sizes; regions are warped from the image at its own resolution, nothing is
    resized); ``targets`` (training) a list of ``{"boxes": Tensor[N, 4] xyxy pixels, "labels": Tensor[N] int64 in
    [1, num_classes)}``; ``proposals`` (optional) a list of ``Tensor[K_i, 4]`` per image replacing the proposal
    generator (truncated to the mode's cap); ``image_ids`` for a proposal table (else read from the targets).
    Training returns ``{"loss_classifier", "loss_svm", "loss_box_reg"}``; evaluation one ``{"boxes", "labels",
    "scores"}`` dict per image, boxes in image pixels.

    Args:
        backbone (nn.Module): ``[N, 3, S, S] -> [N, D]`` features, with an ``out_features`` attribute (D).
        num_classes (int): including background (>= 2).
        proposal_generator (optional): a callable ``image -> Tensor[K, 4]`` (xyxy, image pixels), a proposals file
            or a ``{image_id: boxes}`` mapping (a :class:`~fastdet.models.proposals.ProposalTable`: ``forward``
            then takes ``image_ids=`` or reads the targets' ``"image_id"``), as Fast R-CNN's
            (:func:`~fastdet.models.proposals.make_proposal_source`); default :class:`SelectiveSearchProposals` with
            ``proposal_mode``, ``max_proposals_train``, ``max_proposals_test`` and ``proposal_max_side`` (a module:
            ``train()`` / ``eval()`` switch its cap). Proposals from any source are cut to the mode's cap.
        warp_size (int): side of the warped regions (227, the paper's).
        context_padding (float, optional): context pixels around a region in the warped output (default
            ``16 * warp_size / 227``, the paper's 16 at 227).
        sampling_ratio (int): bilinear samples per warped pixel and axis (2).
        image_mean, image_std: normalisation (ImageNet's by default).
        fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction: fine-tuning sample (0.5, 0.5, 128,
            0.25: the paper's 32 positives + 96 background).
        svm_negative_iou_thresh (float): SVM negatives' IoU bound with every ground-truth box of the class (0.3).
        svm_hard_negatives (int): hard negatives kept per class and batch (64).
        svm_l2, bbox_reg_l2 (float): ridge coefficients of the SVMs and the box regressors (1e-4, 1e-3).
        bbox_reg_iou_thresh (float): regression pairs need IoU above this (0.6).
        score_thresh (float): on ``sigmoid(margin)`` (0.05); nms_thresh (0.3); detections_per_img (100).
        pre_nms_top_k (int): candidates per image entering NMS (proposals x classes are ranked; 4000).
        feature_batch_size (int): warped regions per CNN call at inference (bounds memory; 512).
        feature_norm (float): L2 norm the features are scaled to before the SVMs and box regressors (1.0; see
            :meth:`svm_features`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, proposal_generator=None, proposal_mode: str = "fast",
                 max_proposals_train: int | None = 2000, max_proposals_test: int | None = 1000,
                 proposal_max_side: int | None = 500, warp_size: int = 227, context_padding: float | None = None,
                 sampling_ratio: int = 2, image_mean=None, image_std=None, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.5, batch_size_per_image: int = 128, positive_fraction: float = 0.25,
                 svm_negative_iou_thresh: float = 0.3, svm_hard_negatives: int = 64, svm_l2: float = 1e-4,
                 bbox_reg_iou_thresh: float = 0.6, bbox_reg_l2: float = 1e-3, score_thresh: float = 0.05,
                 nms_thresh: float = 0.3, detections_per_img: int = 100, pre_nms_top_k: int = 4000,
                 feature_batch_size: int = 512, feature_norm: float = 1.0):
        super().__init__()
        feature_dim = getattr(backbone, "out_features", None)
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError("backbone must have an 'out_features' attribute (the int size of its feature vectors), "
                             f"got {feature_dim!r}")
        _check_positive_int(num_classes, "num_classes", 2)
        self.warp_size = _check_positive_int(warp_size, "warp_size")
        if context_padding is None:
            context_padding = 16.0 * warp_size / 227.0
        context_padding = _check_non_negative(context_padding, "context_padding")
        if not context_padding < warp_size / 2:
            raise ValueError(f"context_padding must be < warp_size / 2 = {warp_size / 2}, got {context_padding}")
        self.context_padding = context_padding
        self.sampling_ratio = _check_positive_int(sampling_ratio, "sampling_ratio")
        if proposal_generator is None:
            proposal_generator = SelectiveSearchProposals(proposal_mode, max_proposals_train, max_proposals_test,
                                                          proposal_max_side)
        self.proposal_generator = make_proposal_source(proposal_generator)
        self.max_proposals_train = max_proposals_train
        self.max_proposals_test = max_proposals_test
        # Only the transform's normalisation and batching are used: R-CNN warps regions at the image's resolution.
        self.transform = DetectionTransform(1, 1, image_mean or IMAGENET_MEAN, image_std or IMAGENET_STD,
                                            size_divisible=1)
        self.backbone = backbone
        self.num_classes = num_classes
        self.cls_score = nn.Linear(feature_dim, num_classes)
        self.svm = nn.Linear(feature_dim, num_classes - 1)
        self.bbox_pred = nn.Linear(feature_dim, 4 * (num_classes - 1))
        self._init_heads()
        self.fine_tune_matcher = Matcher(_check_fraction(fg_iou_thresh, "fg_iou_thresh"),
                                         _check_fraction(bg_iou_thresh, "bg_iou_thresh"))
        self.sampler = BalancedPositiveNegativeSampler(_check_positive_int(batch_size_per_image,
                                                                           "batch_size_per_image"),
                                                       _check_fraction(positive_fraction, "positive_fraction"))
        self.svm_negative_iou_thresh = _check_fraction(svm_negative_iou_thresh, "svm_negative_iou_thresh")
        self.svm_hard_negatives = _check_positive_int(svm_hard_negatives, "svm_hard_negatives", 0)
        self.svm_l2 = _check_non_negative(svm_l2, "svm_l2")
        self.bbox_reg_iou_thresh = _check_fraction(bbox_reg_iou_thresh, "bbox_reg_iou_thresh")
        self.bbox_reg_l2 = _check_non_negative(bbox_reg_l2, "bbox_reg_l2")
        self.score_thresh = float(score_thresh)
        self.nms_thresh = _check_fraction(nms_thresh, "nms_thresh")
        self.detections_per_img = _check_positive_int(detections_per_img, "detections_per_img")
        self.pre_nms_top_k = _check_positive_int(pre_nms_top_k, "pre_nms_top_k")
        self.feature_batch_size = _check_positive_int(feature_batch_size, "feature_batch_size")
        self.feature_norm = _check_non_negative(feature_norm, "feature_norm")
        if self.feature_norm == 0:
            raise ValueError("feature_norm must be > 0")

    def _init_heads(self) -> None:
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.normal_(self.svm.weight, std=0.01)
        nn.init.zeros_(self.svm.bias)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning on other classes: fresh softmax classifier, SVMs and box regressors for ``num_classes``
        (background included), on the old layers' device and dtype; the CNN stays as loaded."""
        _check_positive_int(num_classes, "num_classes", 2)
        old = self.cls_score.weight
        dim = old.shape[1]
        self.cls_score = nn.Linear(dim, num_classes).to(old.device, old.dtype)
        self.svm = nn.Linear(dim, num_classes - 1).to(old.device, old.dtype)
        self.bbox_pred = nn.Linear(dim, 4 * (num_classes - 1)).to(old.device, old.dtype)
        self._init_heads()
        self.num_classes = num_classes

    # -- shared steps ---------------------------------------------------------------------------------------------

    def svm_features(self, features: Tensor) -> Tensor:
        """The SVMs' and box regressors' input: the CNN features scaled to L2 norm ``feature_norm`` each (the
        paper rescales its features to a fixed mean norm; a per-vector norm keeps the linear stages' curvature bounded
        whatever the CNN's activation scale, so they train stably at the CNN's learning rate)."""
        return F.normalize(features.float(), dim=1) * self.feature_norm

    def _proposals(self, images: list[Tensor], proposals, targets=None, image_ids=None) -> list[Tensor]:
        if proposals is None:
            proposals = self.generate_proposals(images, targets, image_ids)
        else:
            check_proposals(proposals, images)
        cap = self.max_proposals_train if self.training else self.max_proposals_test
        return [p[:cap] if cap is not None else p for p in proposals]

    def _batch(self, images: list[Tensor]) -> Tensor:
        return self.transform.batch_images([self.transform.normalize(image) for image in images])

    def warp(self, batch: Tensor, boxes: Tensor) -> Tensor:
        """Warped regions ``[B * P, 3, S, S]`` of ``boxes [B, P, 4]`` from the normalised ``batch``."""
        return warp_boxes(batch, boxes, self.warp_size, self.context_padding, self.sampling_ratio)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, proposals=None, *,
                image_ids=None):
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        region_proposals = self._proposals(images, proposals, targets, image_ids)
        if self.training:
            return self.compute_losses(images, targets, region_proposals)
        detections = self.detect(images, region_proposals)
        return split_padded(detections.num_detections, boxes=detections.boxes, labels=detections.labels,
                            scores=detections.scores)

    # -- training -------------------------------------------------------------------------------------------------

    def compute_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]],
                       proposals: list[Tensor]) -> dict[str, Tensor]:
        """The three losses of a batch (see the module docstring); inputs assumed checked."""
        batch = self._batch(images)
        device = batch.device
        gt = pad_targets(targets, device)
        boxes, valid = pad_proposals([p.to(device) for p in proposals])
        P, G = boxes.shape[1], gt.boxes.shape[1]
        candidates = torch.cat([boxes, gt.boxes], dim=1)  # [B, P + G, 4]: the ground truth joins the proposals
        candidate_valid = torch.cat([valid, gt.valid], dim=1)
        is_gt = torch.zeros_like(candidate_valid)
        is_gt[:, P:] = gt.valid
        usable = gt.valid[:, :, None] & candidate_valid[:, None, :]
        iou = torch.where(usable, box_iou(gt.boxes, candidates), 0.0)  # [B, G, P + G]; 0 where unusable

        # Fine-tuning sample: IoU >= fg positive (the gt's label), < bg background, balanced.
        matches = self.fine_tune_matcher(iou, gt.valid, candidate_valid)
        labels = gt.labels.gather(1, matches.clamp(min=0))
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where((matches == BETWEEN_THRESHOLDS) | ~candidate_valid, -1, labels)
        positive, negative = self.sampler(labels)
        sampled = positive | negative
        # Warped set: the sample plus every ground-truth box (the SVMs' positives).
        slots = min(self.sampler.batch_size_per_image + G, P + G)
        index, slot_valid = compact_mask(sampled | is_gt, slots)
        slot_boxes = gather_rows(candidates, index)
        slot_labels = labels.gather(1, index)
        slot_sampled = sampled.gather(1, index) & slot_valid
        slot_is_gt = is_gt.gather(1, index) & slot_valid
        slot_iou = iou.gather(2, index[:, None, :].expand(-1, G, -1))  # [B, G, S]

        features = self.backbone(self.warp(batch, slot_boxes))  # [B * S, D]
        loss_classifier = self._classifier_loss(features, slot_labels, slot_sampled)
        detached = self.svm_features(features.detach())
        loss_svm = self._svm_loss(detached, gt.labels, gt.valid, slot_iou, slot_labels, slot_is_gt, slot_valid)
        loss_box_reg = self._box_loss(detached, gt.boxes, gt.labels, slot_iou, slot_boxes, slot_is_gt, slot_valid)
        return {"loss_classifier": loss_classifier, "loss_svm": loss_svm, "loss_box_reg": loss_box_reg}

    def _classifier_loss(self, features: Tensor, labels: Tensor, sampled: Tensor) -> Tensor:
        logits = self.cls_score(features).float()
        labels, sampled = labels.reshape(-1), sampled.reshape(-1)
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return torch.where(sampled, ce, 0.0).sum() / sampled.sum().clamp(min=1).float()

    def _svm_loss(self, features: Tensor, gt_labels: Tensor, gt_valid: Tensor, slot_iou: Tensor, slot_labels: Tensor,
                  slot_is_gt: Tensor, slot_valid: Tensor) -> Tensor:
        K = self.num_classes - 1
        classes = torch.arange(1, K + 1, device=gt_labels.device)
        gt_of_class = (gt_labels[:, :, None] == classes) & gt_valid[:, :, None]  # [B, G, K]
        # Best IoU of each slot with the ground truth of each class: [B, S, K] (0 where the class has none).
        best = torch.where(gt_of_class[:, :, None, :], slot_iou[..., None], 0.0).amax(dim=1)
        positive = slot_is_gt[..., None] & (slot_labels[..., None] == classes)
        negative = slot_valid[..., None] & (best < self.svm_negative_iou_thresh) & ~positive
        scores = self.svm(features)
        loss, _ = svm_hinge_loss(scores, positive.reshape(-1, K), negative.reshape(-1, K), self.svm_hard_negatives,
                                 self.svm.weight, self.svm_l2)
        return loss

    def _box_loss(self, features: Tensor, gt_boxes: Tensor, gt_labels: Tensor, slot_iou: Tensor, slot_boxes: Tensor,
                  slot_is_gt: Tensor, slot_valid: Tensor) -> Tensor:
        best_iou, best_gt = slot_iou.max(dim=1)  # [B, S]
        # Pairs: proposals (not the ground-truth boxes themselves) with IoU > threshold, with their best box.
        selected = slot_valid & ~slot_is_gt & (best_iou > self.bbox_reg_iou_thresh)
        matched = gather_rows(gt_boxes, best_gt)
        targets = box_encode(matched.reshape(-1, 4), slot_boxes.reshape(-1, 4), PAPER_BOX_WEIGHTS)
        selected = selected.reshape(-1)
        targets = torch.where(selected[:, None], targets, 0.0)  # padding slots: log(0 / 0)
        classes = gt_labels.gather(1, best_gt).reshape(-1).clamp(min=1) - 1
        per_class = self.bbox_pred(features).reshape(-1, self.num_classes - 1, 4)
        predictions = per_class.gather(1, classes[:, None, None].expand(-1, 1, 4)).squeeze(1)
        return box_regression_loss(predictions, targets, selected, self.bbox_pred.weight, self.bbox_reg_l2)

    # -- inference ------------------------------------------------------------------------------------------------

    def _features_in_chunks(self, crops: Tensor) -> Tensor:
        if crops.shape[0] <= self.feature_batch_size:
            return self.backbone(crops)
        return torch.cat([self.backbone(chunk) for chunk in crops.split(self.feature_batch_size)])

    def detect(self, images: list[Tensor], proposals: list[Tensor]) -> Detections:
        """Padded ``[B, K]`` detections (labels 1.., -1 in padding slots) of checked images and their proposals."""
        batch = self._batch(images)
        device = batch.device
        boxes, valid = pad_proposals([p.to(device) for p in proposals])
        B, P, _ = boxes.shape
        K = self.num_classes - 1
        features = self._features_in_chunks(self.warp(batch, boxes))
        features = self.svm_features(features)
        margins = self.svm(features).float().reshape(B, P, K)
        deltas = self.bbox_pred(features).float().reshape(B * P, 4 * K)
        regressed = box_decode(deltas, boxes.reshape(B * P, 4), PAPER_BOX_WEIGHTS).reshape(B, P, K, 4)
        sizes = image_sizes_tensor([tuple(img.shape[-2:]) for img in images], device)
        regressed = clip_boxes_to_images(regressed, sizes)
        widths = regressed[..., 2] - regressed[..., 0]
        heights = regressed[..., 3] - regressed[..., 1]
        usable = valid[..., None] & (widths >= MIN_DETECTION_SIZE) & (heights >= MIN_DETECTION_SIZE)
        scores = torch.where(usable, torch.sigmoid(margins), float("-inf"))
        out_boxes, out_scores, out_labels, count = multiclass_nms(regressed, scores, self.score_thresh,
                                                                  self.nms_thresh, self.detections_per_img,
                                                                  min(self.pre_nms_top_k, P * K))
        out_labels = torch.where(out_labels >= 0, out_labels + 1, out_labels)
        return Detections(out_boxes, out_scores, out_labels, count)


# -- builders ---------------------------------------------------------------------------------------------------------


def resnet_region_features(depth: int, norm_layer, trainable_layers: int, state_dict=None,
                           representation_size: int | None = None) -> nn.Module:
    """A ResNet-``depth`` (torchvision's architecture and names, ``state_dict`` an ImageNet classifier's) whose ``fc``
    is replaced by an identity (globally pooled features) or a ``representation_size`` Linear + ReLU, with
    ``out_features`` set; the last ``trainable_layers`` stages train."""
    body = resnet(depth, norm_layer=norm_layer)
    if state_dict is not None:
        body.load_state_dict(state_dict)
    freeze_resnet_stages(body, trainable_layers)
    pooled = body.fc.in_features
    if representation_size is None:
        body.fc = nn.Identity()
        body.out_features = pooled
    else:
        _check_positive_int(representation_size, "representation_size")
        body.fc = nn.Sequential(nn.Linear(pooled, representation_size), nn.ReLU(inplace=True))
        body.out_features = representation_size
    return body


def _rcnn(depth: int, *, weights, progress: bool, num_classes: int | None, weights_backbone,
          trainable_backbone_layers: int | None, **kwargs) -> RCNN:
    # R-CNN fine-tunes the whole network: every stage trains by default, pretrained or not.
    plan = plan_build(None, f"ResNet{depth}_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=5, default_trainable_layers=5, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", None))
    backbone = resnet_region_features(depth, plan.norm_layer, plan.trainable_backbone_layers,
                                      plan.backbone_state_dict(progress), kwargs.pop("representation_size", None))
    model = RCNN(backbone, plan.num_classes, **kwargs)
    return plan.load_into(model, progress)


def rcnn_resnet18(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
                  trainable_backbone_layers: int | None = None, **kwargs) -> RCNN:
    """R-CNN on a ResNet-18, CPU-friendly: regions warped to 64 x 64 (``warp_size``; 5 px context), pooled 512-d
    features.

    Args:
        weights: a ``.pth`` path or a state dict of this architecture (no published R-CNN weights).
        progress (bool): progress bar when a download is allowed.
        num_classes (int, optional): background included (default 91).
        weights_backbone: ``ResNet18_Weights`` (enum, name, path or state dict; see :mod:`fastdet.models.weights`).
        trainable_backbone_layers (int in [0, 5]): stages that train, from ``layer4`` down (default 5: all, as the
            paper fine-tunes the whole CNN; 0 trains the SVMs and regressors on fixed features).
        **kwargs: ``norm_layer`` (default ``FrozenBatchNorm2d`` when pretrained, else ``BatchNorm2d``),
            ``representation_size`` (an fc layer after pooling), and :class:`RCNN`'s arguments
            (``max_proposals_train``, ``max_proposals_test``, ``warp_size``, ...).
    """
    kwargs.setdefault("warp_size", 64)
    return _rcnn(18, weights=weights, progress=progress, num_classes=num_classes, weights_backbone=weights_backbone,
                 trainable_backbone_layers=trainable_backbone_layers, **kwargs)


def rcnn_resnet50(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
                  trainable_backbone_layers: int | None = None, **kwargs) -> RCNN:
    """R-CNN on a ResNet-50 at the paper's 227 x 227 warp (16 px context), pooled 2048-d features; arguments as
    :func:`rcnn_resnet18` (``weights_backbone``: ``ResNet50_Weights``)."""
    return _rcnn(50, weights=weights, progress=progress, num_classes=num_classes, weights_backbone=weights_backbone,
                 trainable_backbone_layers=trainable_backbone_layers, **kwargs)
