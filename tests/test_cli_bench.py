"""``fastdet bench``'s agreement check for the NMS ops: exactly tied scores may come out in another order than
torchvision's (the README's tie note), anything else is still a disagreement (issue 11)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastdet.cli.bench import cases, nms_results_agree

# Boxes 1, 3 and 4 tie at 0.5.
SCORES = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.5, 0.3])


def test_the_same_set_and_score_sequence_in_another_index_order_agrees():
    ours = torch.tensor([0, 2, 1, 3, 4])  # ties by index, as fastdet orders them
    theirs = torch.tensor([0, 2, 4, 1, 3])  # the tied boxes in another order, as torchvision's unstable sort may
    assert not torch.equal(ours, theirs)
    assert nms_results_agree(ours, theirs, SCORES)
    assert nms_results_agree(theirs, ours, SCORES)
    assert nms_results_agree(ours, ours.clone(), SCORES)
    empty = torch.empty(0, dtype=torch.int64)
    assert nms_results_agree(empty, empty, SCORES)


@pytest.mark.parametrize("theirs", [
    [0, 2, 1, 4],  # another tied box kept: the same score sequence, a different set
    [0, 2, 1, 5],  # another box with another score
    [0, 2, 1],  # one box fewer
    [0, 2, 1, 3, 4],  # one box more
])
def test_a_different_kept_set_disagrees(theirs):
    ours = torch.tensor([0, 2, 1, 3])
    assert not nms_results_agree(ours, torch.tensor(theirs), SCORES)
    assert not nms_results_agree(torch.tensor(theirs), ours, SCORES)


@pytest.mark.parametrize("theirs", [
    [2, 0, 1, 3],  # two untied boxes swapped
    [0, 1, 2, 3],  # a tied box swapped with an untied one
])
def test_the_same_set_with_another_score_order_disagrees(theirs):
    ours = torch.tensor([0, 2, 1, 3])
    assert not nms_results_agree(ours, torch.tensor(theirs), SCORES)


def test_bench_default_nms_inputs_agree_with_torchvision():
    # `fastdet bench` with its defaults (seed 0, scale 1) has exactly tied scores that torchvision's CPU batched NMS
    # keeps in another order than fastdet: a healthy build must still report agreement there.
    pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    nms_cases = list(itertools.islice(cases(torch.device("cpu"), 1.0, gen), 2))
    assert [name.split()[0] for name, *_ in nms_cases] == ["nms", "batched_nms"]
    for name, ours, theirs, _, compare in nms_cases:
        assert compare(ours(), theirs()), name
