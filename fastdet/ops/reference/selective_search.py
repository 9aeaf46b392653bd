"""Reference of selective search's grouping and ranking stages (the test oracle of ``fastdet.ops.selective_search``).

:func:`hierarchical_grouping` rebuilds one strategy's hierarchy from a given initial segmentation and each pixel's
histogram bins, choosing each merge by scanning every neighbouring pair (no heap), with exact integer histogram
intersections; :func:`rank_proposals` ranks several hierarchies as the paper does with the native kernel's generator.
Slow and plain by design: Python loops over regions, meant for tiny images.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hierarchical_grouping", "rank_proposals"]

_MASK64 = (1 << 64) - 1
_SIMILARITY_BITS = {"C": 1, "T": 2, "S": 4, "F": 8}


def _histograms(labels: Tensor, bins: Tensor, num_regions: int, num_bins: int) -> list[list[int]]:
    index = labels.reshape(1, -1) * num_bins + bins.reshape(bins.shape[0], -1)
    counts = torch.bincount(index.reshape(-1), minlength=num_regions * num_bins).reshape(num_regions, num_bins)
    return counts.tolist()


def _neighbour_pairs(labels: Tensor) -> set[tuple[int, int]]:
    pairs = set()
    shifts = [(labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :]), (labels[:-1, :-1], labels[1:, 1:]),
              (labels[:-1, 1:], labels[1:, :-1])]
    for a, b in shifts:
        a, b = a.reshape(-1), b.reshape(-1)
        differ = a != b
        lo = torch.minimum(a, b)[differ].tolist()
        hi = torch.maximum(a, b)[differ].tolist()
        pairs.update(zip(lo, hi))
    return pairs


def _intersection(ha: list[int], hb: list[int], na: int, nb: int) -> int:
    return sum(min(x * nb, y * na) for x, y in zip(ha, hb))


def hierarchical_grouping(labels: Tensor, colour_bins: Tensor, texture_bins: Tensor, similarities: str) -> Tensor:
    """Greedy hierarchical grouping of an initial segmentation.

    Args:
        labels (Tensor[H, W] int64): initial segments numbered 0..R-1.
        colour_bins (Tensor[C, H, W] int64): each pixel's bin per channel in a region's colour histogram (25 C bins).
        texture_bins (Tensor[C * 8, H, W] int64): each pixel's bin per channel and orientation in a region's texture
            histogram (80 C bins).
        similarities (str): letters of ``"CTSF"`` (colour, texture, size, fill), summed in that order.

    Returns:
        Tensor[2R - 1, 4] float32: every region's box (x1, y1, x2, y2), x2 / y2 exclusive, in creation order: segments
        0..R-1, then the region made by each merge. The merged pair is the most similar neighbouring pair, ties to
        the smaller (a, b) ids.
    """
    H, W = labels.shape
    C = colour_bins.shape[0]
    R = int(labels.max()) + 1
    flat = labels.reshape(-1)
    sizes = torch.bincount(flat, minlength=R).tolist()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    big = H + W
    boxes = [list(t) for t in zip(
        torch.full((R,), big).scatter_reduce(0, flat, xs.reshape(-1), "amin").tolist(),
        torch.full((R,), big).scatter_reduce(0, flat, ys.reshape(-1), "amin").tolist(),
        torch.full((R,), -1).scatter_reduce(0, flat, xs.reshape(-1), "amax").tolist(),
        torch.full((R,), -1).scatter_reduce(0, flat, ys.reshape(-1), "amax").tolist(),
    )]
    colour = _histograms(labels, colour_bins, R, 25 * C)
    texture = _histograms(labels, texture_bins, R, 80 * C)
    image = float(H * W)

    def similarity(a: int, b: int) -> float:
        na, nb = sizes[a], sizes[b]
        s = 0.0
        if "C" in similarities:
            s += float(_intersection(colour[a], colour[b], na, nb)) / float(C * na * nb)
        if "T" in similarities:
            s += float(_intersection(texture[a], texture[b], na, nb)) / float(8 * C * na * nb)
        if "S" in similarities:
            s += 1.0 - float(na + nb) / image
        if "F" in similarities:
            p, q = boxes[a], boxes[b]
            w = max(p[2], q[2]) - min(p[0], q[0]) + 1
            h = max(p[3], q[3]) - min(p[1], q[1]) + 1
            s += 1.0 - float(w * h - na - nb) / image
        return s

    neighbours: dict[int, set[int]] = {r: set() for r in range(R)}
    pairs: dict[tuple[int, int], float] = {}
    for a, b in _neighbour_pairs(labels):
        neighbours[a].add(b)
        neighbours[b].add(a)
        pairs[(a, b)] = similarity(a, b)
    while pairs:
        a, b = max(pairs, key=lambda ab: (pairs[ab], -ab[0], -ab[1]))
        c = len(sizes)
        sizes.append(sizes[a] + sizes[b])
        p, q = boxes[a], boxes[b]
        boxes.append([min(p[0], q[0]), min(p[1], q[1]), max(p[2], q[2]), max(p[3], q[3])])
        colour.append([x + y for x, y in zip(colour[a], colour[b])])
        texture.append([x + y for x, y in zip(texture[a], texture[b])])
        around = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for r in around:
            neighbours[r] -= {a, b}
            neighbours[r].add(c)
        neighbours[c] = around
        pairs = {ab: s for ab, s in pairs.items() if a not in ab and b not in ab}
        for r in around:
            pairs[(r, c)] = similarity(r, c)
    out = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return out + torch.tensor([0.0, 0.0, 1.0, 1.0])


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def rank_proposals(hierarchies: list[Tensor], seed: int = 0, max_proposals: int | None = None) -> Tensor:
    """The paper's ranking of several strategies' hierarchies (each ``[T_s, 4]`` in creation order): region i of
    strategy s gets value ``(T_s - i) * u``, u uniform in [0, 1) from splitmix64 seeded with
    ``seed * 0xD1B54A32D192ED03 + (s + 1) * 0x9E3779B97F4A7C15`` (mod 2**64); regions sorted by (value, s, i), later
    duplicates of a box dropped, at most ``max_proposals`` kept."""
    entries = []
    for s, boxes in enumerate(hierarchies):
        state = (seed * 0xD1B54A32D192ED03 + (s + 1) * 0x9E3779B97F4A7C15) & _MASK64
        T = boxes.shape[0]
        for i in range(T):
            state, z = _splitmix64(state)
            entries.append((float(T - i) * ((z >> 11) * (1.0 / 9007199254740992.0)), s, i))
    entries.sort()
    out, seen = [], set()
    for _, s, i in entries:
        if max_proposals is not None and len(out) >= max_proposals:
            break
        box = tuple(hierarchies[s][i].tolist())
        if box not in seen:
            seen.add(box)
            out.append(box)
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)
