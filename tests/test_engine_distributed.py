"""Two-process DistributedDataParallel smoke test on the CPU (gloo), launched through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import fastdet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastdet.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, {tests_dir!r})
    from test_engine_trainer import BoxDataset, ToyDetector
    from fastdet.engine import TrainConfig, Trainer, build_data_loader

    output = sys.argv[1]
    torch.manual_seed(int(os.environ["RANK"]) * 100)  # different initial weights per rank: DDP must sync them
    dataset = BoxDataset(16)
    model = ToyDetector()
    config = TrainConfig(epochs=2, optimizer="sgd", lr=0.05, warmup_iters=2, device="cpu", progress=False,
                         eval_every=1, output_dir=output, log_every=1, seed=5)
    train_loader = build_data_loader(dataset, batch_size=2, seed=5)
    val_loader = build_data_loader(BoxDataset(16, augment=False), batch_size=4, shuffle=False)  # sharded
    trainer = Trainer(model, config, train_loader, val_loader, dataset.coco())
    history = trainer.fit()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    result = {{
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "wrapped": type(trainer.train_model).__name__, "iterations": trainer.iteration,
        "seen": model.seen_image_ids, "history": history,
        "max_parameter_difference": max(float((g - flat).abs().max()) for g in gathered),
    }}
    with open(os.path.join(output, f"rank{{dist.get_rank()}}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(tests_dir=TESTS_DIR))
    output = tmp_path / "out"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), str(output)]
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {error.timeout} s:\n{error.stdout}\n{error.stderr}")
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"

    results = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2 and result["backend"] == "gloo"
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["iterations"] == 2 * 4  # 16 images / 2 ranks / batch 2, for 2 epochs
        assert result["max_parameter_difference"] == 0.0  # gradients averaged: ranks stay in lockstep
    # each epoch, the two ranks read disjoint halves of the dataset
    for epoch in range(2):
        halves = [set(result["seen"][epoch * 8:(epoch + 1) * 8]) for result in results]
        assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(range(1, 17))
    # logged losses are averaged over ranks, and evaluation statistics are broadcast from rank 0: same history
    assert results[0]["history"] == [dict(r, time_s=results[0]["history"][i]["time_s"],
                                          images_per_s=results[0]["history"][i]["images_per_s"])
                                     for i, r in enumerate(results[1]["history"])]
    assert "val_AP" in results[0]["history"][-1]
    # rank 0 alone writes checkpoints and logs
    assert (output / "last.pt").exists() and (output / "metrics.jsonl").exists()
    checkpoint = torch.load(output / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_states"]) == 2
    assert not torch.equal(checkpoint["rng_states"][0]["torch"], checkpoint["rng_states"][1]["torch"])
