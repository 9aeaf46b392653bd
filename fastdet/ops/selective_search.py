"""Selective search (Uijlings et al., "Selective Search for Object Recognition", IJCV 2013): class-agnostic region
proposals from a bottom-up hierarchy of image segments, natively on the CPU. The proposals of R-CNN.

For every *strategy* (colour space, segmentation scale k, similarity measures) the image is over-segmented with
Felzenszwalb-Huttenlocher's graph segmentation, then the most similar neighbouring regions are merged repeatedly until
one region covers the image; every region of the hierarchy is a proposal. The paper's diversification modes:

* ``"single"``: HSV x k = 100 x colour+texture+size+fill (1 strategy);
* ``"fast"``: {HSV, Lab} x k in {50, 100} x {C+T+S+F, T+S+F} (8 strategies);
* ``"quality"``: {HSV, Lab, rgI, H, I} x k in {50, 100, 150, 300} x {C+T+S+F, T+S+F, F, S} (80 strategies).

Proposals are ranked as in the paper: a region's value is its position in its strategy's hierarchy (1 = the last
merge, the whole image) times a uniform random number; all strategies' regions are sorted by increasing value and
duplicate boxes dropped. ``seed`` makes that draw reproducible (the result does not depend on the thread count).

The algorithm (colour conversions, texture histograms, tie-breaking) is written out in
``csrc/ops/cpu/selective_search.cpp``. Strategies run in parallel on torch's intra-op threads. There is no CUDA
kernel (segmentation and greedy grouping are sequential per strategy): a CUDA image raises an error asking for
``.cpu()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_fake

__all__ = ["selective_search"]

#: Colour spaces by name: the channels segmentation and histograms are computed in ("h": the hue of HSV, "i": the
#: intensity (R + G + B) / 3, "l": the L of Lab, each one channel).
COLOR_SPACES = {"rgb": 0, "hsv": 1, "lab": 2, "rgi": 3, "h": 4, "i": 5, "l": 6}
#: Similarity measures by letter: colour, texture, size, fill (summed).
SIMILARITIES = {"C": 1, "T": 2, "S": 4, "F": 8}

MODES: dict[str, list[tuple[str, int, str]]] = {
    "single": [("hsv", 100, "CTSF")],
    "fast": [(space, k, sim) for space in ("hsv", "lab") for k in (50, 100) for sim in ("CTSF", "TSF")],
    "quality": [
        (space, k, sim)
        for space in ("hsv", "lab", "rgi", "h", "i")
        for k in (50, 100, 150, 300)
        for sim in ("CTSF", "TSF", "F", "S")
    ],
}


def _encode_strategy(strategy) -> list[int]:
    try:
        space, k, sims = strategy
    except (TypeError, ValueError):
        raise ValueError(f"a strategy must be a (colour space, k, similarities) triple, got {strategy!r}") from None
    if space not in COLOR_SPACES:
        raise ValueError(f"colour space must be one of {sorted(COLOR_SPACES)}, got {space!r}")
    if not isinstance(sims, str) or not sims or any(c not in SIMILARITIES for c in sims) or len(set(sims)) != len(sims):
        raise ValueError(f"similarities must be a string of distinct letters from 'CTSF', got {sims!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    return [COLOR_SPACES[space], k, sum(SIMILARITIES[c] for c in sims)]


def _encode_strategies(mode: str, strategies) -> list[int]:
    if strategies is None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        strategies = MODES[mode]
    strategies = list(strategies)
    if not strategies:
        raise ValueError("strategies must not be empty")
    return [v for s in strategies for v in _encode_strategy(s)]


def _int_arg(value, name: str, none_as: int, minimum: int) -> int:
    if value is None:
        return none_as
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def selective_search(
    image: Tensor,
    mode: str = "fast",
    *,
    strategies=None,
    min_size: int | None = None,
    sigma: float = 0.8,
    max_proposals: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Selective search region proposals of one image.

    Args:
        image (Tensor[3, H, W]): RGB, channels first (torchvision's layout), uint8 in 0..255 or floating in [0, 1]
            (clamped, then rounded to 1/255 steps), on the CPU, at most 2048 x 2048 pixels (resize larger images
            first; the paper works at ~500 pixels).
        mode (str): ``"single"``, ``"fast"`` or ``"quality"`` (see the module docstring); ignored with ``strategies``.
        strategies: instead of a mode, a list of ``(colour_space, k, similarities)`` triples, e.g.
            ``[("hsv", 100, "CTSF")]``; colour spaces as in :data:`COLOR_SPACES`, similarities letters of ``"CTSF"``.
        min_size (int, optional): segments smaller than this many pixels are merged into a neighbour after the graph
            segmentation; ``None`` (default) uses each strategy's k.
        sigma (float): standard deviation of the Gaussian smoothing before segmentation (0.8, as the paper).
        max_proposals (int, optional): keep at most this many (the best ranked); ``None`` keeps all.
        seed (int): seed of the ranking's random draw.

    Returns:
        boxes (Tensor[K, 4] float32): ``(x1, y1, x2, y2)`` in pixels, best first, no two equal. ``x2`` and ``y2`` are
        exclusive: a region covering pixel columns 3..5 has ``x1 = 3, x2 = 6`` (so the whole image is
        ``(0, 0, W, H)``, and the box area is the pixel count of the region's bounding rectangle).
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    codes = _encode_strategies(mode, strategies)
    min_size = _int_arg(min_size, "min_size", 0, 1)
    max_proposals = _int_arg(max_proposals, "max_proposals", -1, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return native("selective_search")(image, codes, min_size, float(sigma), max_proposals, seed)


def _selective_search_regions(image: Tensor, strategy, min_size: int | None = None, sigma: float = 0.8):
    """One strategy's hierarchy, for tests and for studying the grouping: ``(boxes [T, 4] float32 in creation order
    (the initial segments by label, then one region per merge), labels [H, W] int64 (the initial segmentation),
    colour_bins [C, H, W] int64, texture_bins [C * 8, H, W] int64)``, the bins being each pixel's indices into a
    region's colour (25 C bins) and texture (80 C bins) histograms."""
    codes = _encode_strategy(strategy)
    return native("_selective_search_regions")(image, codes, _int_arg(min_size, "min_size", 0, 1), float(sigma))


def _proposal_count(max_proposals: int):
    """The data-dependent number of proposals: an unbacked symint, at most max_proposals when that is set."""
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size(max=max_proposals) if max_proposals >= 0 else ctx.new_dynamic_size()


# Fake kernels: the number of proposals depends on the image's content.
@register_fake("selective_search")
def _selective_search_fake(image, strategies, min_size, sigma, max_proposals, seed):
    return image.new_empty((_proposal_count(max_proposals), 4), dtype=torch.float32)


@register_fake("_selective_search_kernel")
def _selective_search_kernel_fake(image, strategies, min_size, sigma, max_proposals, seed):
    return image.new_empty((_proposal_count(max_proposals), 4), dtype=torch.float32)


def _regions_fake(image, strategy, min_size, sigma):
    channels = 1 if strategy[0] in (COLOR_SPACES["h"], COLOR_SPACES["i"], COLOR_SPACES["l"]) else 3
    height, width = image.shape[1], image.shape[2]
    count = torch.library.get_ctx().new_dynamic_size()
    return (
        image.new_empty((count, 4), dtype=torch.float32),
        image.new_empty((height, width), dtype=torch.int64),
        image.new_empty((channels, height, width), dtype=torch.int64),
        image.new_empty((8 * channels, height, width), dtype=torch.int64),
    )


register_fake("_selective_search_regions")(_regions_fake)
register_fake("_selective_search_regions_kernel")(_regions_fake)
