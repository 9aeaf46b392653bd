"""`fastdet proposals`: selective search over a dataset's splits, saved by image id, equal to the detectors' own
search; the file then drives `fastdet eval --proposals`."""

from __future__ import annotations

import torch
from cli_runner import run_fastdet as fastdet

from fastdet.cli._common import load_coco
from fastdet.data import make_shapes_dataset
from fastdet.models.proposals import SelectiveSearchProposals, load_proposals


def test_proposals_command_matches_the_detectors_search(tmp_path):
    make_shapes_dataset(tmp_path / "data", num_images=6, image_size=(96, 80), seed=3, max_objects=2)
    data = tmp_path / "data"
    result = fastdet("proposals", "--data", data, "--output", tmp_path / "out" / "p.pt", "--max-proposals", "50",
                     "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proposals for 6 images" in result.stdout
    table = load_proposals(tmp_path / "out" / "p.pt")
    search = SelectiveSearchProposals("fast", 50, 50).eval()
    seen = 0
    for split in ("train", "val"):
        dataset = load_coco(data / "images", data / "annotations" / f"instances_{split}.json")
        for i in range(len(dataset)):
            image, target = dataset[i]
            boxes = table[int(target["image_id"])]
            assert 0 < boxes.shape[0] <= 50 and torch.equal(boxes, search(image))
            seen += 1
    assert seen == len(table) == 6
    # one split, JSON, quality mode
    result = fastdet("proposals", "--data", data, "--split", "val", "--output", tmp_path / "v.json", "--mode",
                     "quality", "--max-proposals", "20", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    val = load_coco(data / "images", data / "annotations" / "instances_val.json")
    assert set(load_proposals(tmp_path / "v.json")) == {int(r.image_id) for r in val.records}


def test_proposals_command_rejects_bad_arguments(tmp_path):
    make_shapes_dataset(tmp_path / "data", num_images=2, image_size=(48, 48), seed=1, max_objects=1)
    base = ["proposals", "--data", tmp_path / "data", "--no-progress"]
    for extra, message in [(["--output", tmp_path / "p.txt"], "must end in .json, .pt or .pth"),
                           (["--output", tmp_path / "p.pt", "--max-proposals", "0"], "--max-proposals must be >= 1"),
                           (["--output", tmp_path / "p.pt", "--max-side", "0"], "--max-side must be >= 1"),
                           (["--output", tmp_path / "p.pt", "--split", "test"], "no such file"),
                           (["--output", tmp_path / "p.pt", "--split", "train", "train"], "appears twice")]:
        result = fastdet(*base, *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stdout + result.stderr)
