"""Drawing detections onto images (Pillow), for `fastdet predict` and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

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


def draw_detections(image, boxes, labels, scores=None, class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.0, width: int = 2) -> Image.Image:
    """A copy of ``image`` (Tensor[3, H, W] or PIL image) with ``boxes`` (xyxy pixels) drawn and labelled
    ``name score``; detections scoring below ``score_threshold`` are not drawn. Label ``k`` is ``class_names[k - 1]``
    (0 is background in fastdet's label convention)."""
    canvas = to_pil(image) if isinstance(image, torch.Tensor) else image.convert("RGB").copy()
    boxes = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1)
    scores_np = None if scores is None else np.asarray(torch.as_tensor(scores).detach().cpu(), np.float64).reshape(-1)
    if len(labels) != len(boxes) or (scores_np is not None and len(scores_np) != len(boxes)):
        raise ValueError(f"boxes ({len(boxes)}), labels ({len(labels)}) and scores "
                         f"({'-' if scores_np is None else len(scores_np)}) must have the same length")
    draw = ImageDraw.Draw(canvas)
    for i in range(len(boxes)):  # drawing is per box by nature; this is output formatting, not a hot path
        if scores_np is not None and scores_np[i] < score_threshold:
            continue
        label = int(labels[i])
        colour = _PALETTE[label % len(_PALETTE)]
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        name = class_names[label - 1] if class_names is not None and 1 <= label <= len(class_names) else str(label)
        text = name if scores_np is None else f"{name} {scores_np[i]:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        y_text = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, y_text, x1 + (right - left) + 2, y_text + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, y_text), text, fill=(255, 255, 255))
    return canvas


def save_detections(path: str | Path, image, boxes, labels, scores=None, class_names=None,
                    score_threshold: float = 0.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(image, boxes, labels, scores, class_names, score_threshold).save(path)
    return path
