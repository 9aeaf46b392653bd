"""Reproducible train/val/test splits."""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def check_ratios(ratios: Sequence[float], names: Sequence[str] = DEFAULT_SPLIT_NAMES) -> np.ndarray:
    """Validate split ratios (non-negative, finite, positive sum, one per name); returns them normalised to sum 1."""
    try:
        r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"ratios must be a sequence of numbers, got {ratios!r}") from None
    if len(r) != len(names):
        raise ValueError(f"ratios must have one value per split {tuple(names)}, got {tuple(ratios)}")
    if not np.isfinite(r).all() or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"ratios must be finite, non-negative and not all zero, got {tuple(ratios)}")
    return r / r.sum()


def split_counts(n: int, ratios: Sequence[float] = DEFAULT_RATIOS) -> list[int]:
    """How many of ``n`` items each split gets: ``floor(n * ratio)`` each, the remainder going to the splits with the
    largest fractional parts (ties to the earlier split), so the counts always add up to ``n``."""
    r = check_ratios(ratios, [str(i) for i in range(len(ratios))])
    exact = r * n
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts.tolist()


def split_indices(n: int, ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = 0) -> list[np.ndarray]:
    """Partition ``range(n)`` into ``len(ratios)`` disjoint index arrays (each sorted), sizes from
    :func:`split_counts`, membership from a permutation seeded by ``seed``: the same ``(n, ratios, seed)`` always gives
    the same split, on every machine (numpy's PCG64)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    counts = split_counts(int(n), ratios)
    permutation = np.random.default_rng(int(seed)).permutation(int(n))
    bounds = np.cumsum([0, *counts])
    return [np.sort(permutation[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]
