"""Drawing detections onto images (Pillow), for `fastdet predict` and the demo."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct, readable colours (cycled by label).
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def to_pil(image: torch.Tensor) -> Image.Image:
    """``Tensor[3, H, W]`` float in [0, 1] (or uint8) -> RGB PIL image."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a Tensor[3, H, W], got {getattr(image, 'shape', type(image))}")
    array = image.detach().cpu()
    if array.is_floating_point():
        array = (array.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


# Images whose shorter side is under this are enlarged (by a whole factor) before drawing, so that labels in a legible
# font stay small next to the objects: on the demo's 128 px images an unscaled label was wider than most shapes.
MIN_CANVAS_SIDE = 512
_LABEL_PAD = 1  # pixels of label background around the text, each side


@dataclasses.dataclass(frozen=True)
class DrawStyle:
    """How detections are drawn on one image: ``scale`` (whole factor the image is enlarged by; boxes are multiplied
    by it), and the box ``line_width`` and label ``font_size`` in pixels of the enlarged canvas."""

    scale: int
    line_width: int
    font_size: int


def draw_style(width: int, height: int, min_side: int = MIN_CANVAS_SIDE) -> DrawStyle:
    """The :class:`DrawStyle` for a ``width`` x ``height`` image: enlarged by the smallest whole factor that brings its
    shorter side to ``min_side`` (1 for images that large already), then a line width and font size proportional to
    the canvas (about 1/256 and 1/40 of its shorter side; at least 1 and 10 px)."""
    short = max(1, min(int(width), int(height)))
    scale = max(1, math.ceil(min_side / short))
    canvas_short = short * scale
    return DrawStyle(scale=scale, line_width=max(1, round(canvas_short / 256)),
                     font_size=max(10, round(canvas_short / 40)))


@functools.lru_cache(maxsize=16)
def label_font(size: int):
    """Pillow's built-in font at ``size`` px (scalable when Pillow has FreeType; else its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def label_box(box: Sequence[float], text_size: tuple[float, float], image_size: tuple[float, float],
              pad: float = _LABEL_PAD) -> tuple[float, float, float, float]:
    """Where the label of ``box`` (x1, y1, x2, y2) goes on an image of ``image_size`` (width, height): the
    (left, top, right, bottom) of a background of the text's ``text_size`` (width, height) plus ``pad`` per side.

    It sits on the box's top-left corner, above the box, or inside the box's top where there is no room above; it is
    shifted left where it would cross the right edge and kept within the image on every side (a label wider or taller
    than the image starts at its left or top edge)."""
    x1, y1 = float(box[0]), float(box[1])
    width, height = float(text_size[0]) + 2 * pad, float(text_size[1]) + 2 * pad
    image_width, image_height = float(image_size[0]), float(image_size[1])
    top = y1 - height if y1 - height >= 0 else y1
    left = max(0.0, min(x1, image_width - width))
    top = max(0.0, min(top, image_height - height))
    return left, top, left + width, top + height


def draw_detections(image, boxes, labels, scores=None, class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.0, width: int | None = None,
                    min_side: int = MIN_CANVAS_SIDE, masks=None, mask_threshold: float = 0.5) -> Image.Image:
    """A copy of ``image`` (Tensor[3, H, W] or PIL image) with ``boxes`` (xyxy pixels) drawn and labelled
    ``name score``; detections scoring below ``score_threshold`` are not drawn. Label ``k`` is ``class_names[k - 1]``
    (0 is background in fastdet's label convention).

    An image whose shorter side is under ``min_side`` comes back enlarged by a whole factor (:func:`draw_style`; pixel
    replication, boxes scaled with it), so that labels are legible yet smaller than the objects. The font size and the
    box line width (``width``, in pixels of the drawn image; default scaled to it) follow the size of the drawn
    image, and every label is kept inside it (:func:`label_box`).

    ``masks`` (a mask model's ``Tensor[N, 1, H, W]`` or ``[N, H, W]`` probabilities, image-sized) are painted first:
    the pixels above ``mask_threshold`` of each drawn detection are tinted with its box colour."""
    canvas = to_pil(image) if isinstance(image, torch.Tensor) else image.convert("RGB").copy()
    if masks is not None:
        canvas = _paint_masks(canvas, masks, labels, scores, score_threshold, mask_threshold)
    boxes = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1)
    scores_np = None if scores is None else np.asarray(torch.as_tensor(scores).detach().cpu(), np.float64).reshape(-1)
    if len(labels) != len(boxes) or (scores_np is not None and len(scores_np) != len(boxes)):
        raise ValueError(f"boxes ({len(boxes)}), labels ({len(labels)}) and scores "
                         f"({'-' if scores_np is None else len(scores_np)}) must have the same length")
    style = draw_style(canvas.width, canvas.height, min_side)
    if style.scale > 1:
        canvas = canvas.resize((canvas.width * style.scale, canvas.height * style.scale), Image.NEAREST)
        boxes = boxes * style.scale
    line_width = style.line_width if width is None else width
    font = label_font(style.font_size)
    draw = ImageDraw.Draw(canvas)
    for i in range(len(boxes)):  # drawing is per box by nature; this is output formatting, not a hot path
        if scores_np is not None and scores_np[i] < score_threshold:
            continue
        label = int(labels[i])
        colour = _PALETTE[label % len(_PALETTE)]
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        name = class_names[label - 1] if class_names is not None and 1 <= label <= len(class_names) else str(label)
        text = name if scores_np is None else f"{name} {scores_np[i]:.2f}"
        left, top, right, bottom = font.getbbox(text)
        box_left, box_top, box_right, box_bottom = label_box((x1, y1, x2, y2), (right - left, bottom - top),
                                                             canvas.size)
        draw.rectangle([box_left, box_top, box_right - 1, box_bottom - 1], fill=colour)  # corners inclusive
        draw.text((box_left + _LABEL_PAD - left, box_top + _LABEL_PAD - top), text, fill=(255, 255, 255), font=font)
    return canvas


def _paint_masks(canvas: Image.Image, masks, labels, scores, score_threshold: float,
                 mask_threshold: float) -> Image.Image:
    masks = torch.as_tensor(masks).detach().float().cpu()
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape[0] and tuple(masks.shape[-2:]) != (canvas.height, canvas.width):
        raise ValueError(f"masks must be image-sized [N, H, W] = [N, {canvas.height}, {canvas.width}], got "
                         f"{tuple(masks.shape)}")
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if len(labels) != masks.shape[0]:
        raise ValueError(f"masks ({masks.shape[0]}) and labels ({len(labels)}) must have the same length")
    shown = masks > mask_threshold
    if scores is not None:
        shown &= (torch.as_tensor(scores).detach().cpu().reshape(-1) >= score_threshold)[:, None, None]
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32).copy())
    palette = torch.tensor(_PALETTE, dtype=torch.float32)
    for i in range(masks.shape[0]):  # output formatting, not a hot path
        colour = palette[int(labels[i]) % len(_PALETTE)]
        pixels[shown[i]] = 0.5 * pixels[shown[i]] + 0.5 * colour
    return Image.fromarray(pixels.round().clamp(0, 255).to(torch.uint8).numpy())


def save_detections(path: str | Path, image, boxes, labels, scores=None, class_names=None,
                    score_threshold: float = 0.0, masks=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(image, boxes, labels, scores, class_names, score_threshold, masks=masks).save(path)
    return path
