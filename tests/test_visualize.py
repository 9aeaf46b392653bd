"""Drawn detections on small images (the demo's 128 px): labels scaled to the image, smaller than the objects, and
kept inside the image (issue 11). The geometry is tested, not pixels."""

from __future__ import annotations

import pytest
import torch

from fastdet.visualize import draw_detections, draw_style, label_box, label_font

# Boxes of a 128 x 128 image (xyxy, original pixels) at every edge and corner where a label could be clipped.
EDGE_BOXES = [
    (100.0, 0.0, 127.0, 30.0),  # top-right corner: no room above, too close to the right edge
    (126.0, 60.0, 128.0, 70.0),  # at the right edge
    (40.0, 1.0, 80.0, 40.0),  # at the top edge
    (0.0, 110.0, 20.0, 128.0),  # bottom-left corner
    (120.0, 126.0, 128.0, 128.0),  # bottom-right corner, tiny
    (-5.0, -5.0, 30.0, 30.0),  # partly outside the image
    (50.0, 50.0, 90.0, 90.0),  # in the middle
]
TEXTS = ["triangle 0.95", "circle 1.00", "square 0.30", "7"]


def inside(rect, width, height):
    left, top, right, bottom = rect
    return 0 <= left <= right <= width and 0 <= top <= bottom <= height


def test_label_box_sits_above_the_box_when_there_is_room():
    assert label_box((40, 50, 90, 90), (30, 10), (128, 128), pad=1) == (40, 38, 72, 50)


def test_label_box_moves_inside_at_the_top_and_left_at_the_right_edge():
    left, top, right, bottom = label_box((120, 2, 127, 20), (60, 12), (128, 128), pad=1)
    assert (left, top, right, bottom) == (66, 2, 128, 16)


@pytest.mark.parametrize("box", EDGE_BOXES)
@pytest.mark.parametrize("text", TEXTS)
def test_labels_of_a_128_px_image_lie_within_the_image(box, text):
    style = draw_style(128, 128)
    canvas_width = canvas_height = 128 * style.scale
    left, top, right, bottom = label_font(style.font_size).getbbox(text)
    scaled_box = [v * style.scale for v in box]
    rect = label_box(scaled_box, (right - left, bottom - top), (canvas_width, canvas_height))
    assert inside(rect, canvas_width, canvas_height), (box, text, rect)
    # and in the image's own pixels the label stays small next to the demo's objects (13-58 px on a side)
    assert (rect[3] - rect[1]) / style.scale <= 6 and (rect[2] - rect[0]) / style.scale <= 128 / 4, rect


def test_small_images_are_drawn_enlarged_with_lines_and_font_scaled_to_the_canvas():
    small, large = draw_style(128, 128), draw_style(1333, 800)
    assert small.scale * 128 >= 512 and large.scale == 1
    assert large.font_size > small.font_size >= 10 and large.line_width >= small.line_width >= 1
    assert draw_style(64, 200).scale * 64 >= 512


def test_draw_detections_on_a_128_px_image():
    image = torch.rand(3, 128, 128)
    boxes = torch.tensor(EDGE_BOXES)
    labels = torch.arange(1, len(EDGE_BOXES) + 1)
    scores = torch.linspace(0.3, 0.99, len(EDGE_BOXES))
    drawn = draw_detections(image, boxes, labels, scores, ["a", "b", "c", "d", "e", "f", "g"])
    style = draw_style(128, 128)
    assert drawn.size == (128 * style.scale, 128 * style.scale)
    # large images are drawn at their own size
    assert draw_detections(torch.rand(3, 600, 700), boxes, labels).size == (700, 600)
