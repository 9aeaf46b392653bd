"""Turn a pytest-benchmark JSON into the results table ``benchmarks/RESULTS.md``.

    python benchmarks/report.py bench.json [--output benchmarks/RESULTS.md] [--note "..."]

One section per device (GPU model, or CPU model and core count). Writing a run replaces only the sections of the
devices it measured and keeps every other section of the existing file, so CPU and GPU results can come from
different machines. Until a GPU section exists, the file says that no GPU has been measured.

Needs only the standard library, so it runs anywhere the JSON can be copied to.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
OP_ORDER = ("nms", "batched_nms", "multiclass_nms", "box_iou", "generalized_box_iou", "distance_box_iou",
            "complete_box_iou")
IMPLS = ("fastdet", "torchvision", "reference")

# Issue 5's goals for fastdet's speed-up over torchvision (torchvision median / fastdet median), per kind of device.
# A rule applies to the sizes whose full (issue 5) parameters include the given ones; {} = every size. Goals are
# reported, never asserted.
TARGETS = [
    ("cuda", "nms", {"n": 1_000}, 1.0),
    ("cuda", "nms", {"n": 10_000}, 2.0),
    ("cuda", "nms", {"n": 100_000}, 4.0),
    ("cuda", "batched_nms", {"n": 20_000}, 3.0),
    ("cuda", "batched_nms", {"n": 200_000}, 10.0),
    ("cuda", "multiclass_nms", {}, 10.0),
    ("cuda", "box_iou", {}, 2.0),
    ("cpu", "nms", {}, 1.0),
    ("cpu", "batched_nms", {}, 2.0),
    # Issue 16: multiclass_nms vs a per-image loop of torchvision's batched_nms; soft-NMS and WBF vs ensemble-boxes.
    ("cpu", "multiclass_nms", {}, 2.0),
    ("cpu", "soft_nms", {}, 20.0),
    ("cpu", "weighted_boxes_fusion", {}, 20.0),
    ("cpu", "non_maximum_weighted", {}, 20.0),
    # Issue 15: selective search (fast) vs OpenCV contrib's, same thread count.
    ("cpu", "selective_search", {}, 1.0),
    ("cuda", "focal_loss_fwd_bwd_fp32", {}, 5.0),
    ("cuda", "focal_loss_fwd_bwd_bf16", {}, 5.0),
    ("cpu", "focal_loss_fwd_bwd_fp32", {}, 2.0),
    ("cpu", "focal_loss_fwd_bwd_bf16", {}, 2.0),
    # RoIAlign at the issue's size (batch 8, 512 RoIs per image); bf16's goal is 3x torchvision's own bf16 time.
    ("cuda", "roi_align fwd+bwd float32", {"n": 512}, 2.0),
    ("cuda", "roi_align fwd+bwd bfloat16", {"n": 512}, 3.0),
    ("cpu", "roi_align fwd+bwd float32", {"n": 512}, 1.5),
    ("cuda", "anchors_decode", {}, 5.0),
    # Issue 6: whole Faster R-CNN R50-FPN, batch 8 at 800 x 1333 (benchmarks/test_bench_models.py).
    ("cuda", "faster_rcnn_r50_fpn train step", {"batch": 8, "height": 800, "width": 1333}, 1.3),
    ("cuda", "faster_rcnn_r50_fpn inference", {"batch": 8, "height": 800, "width": 1333}, 1.5),
]

GPU_PLACEHOLDER_KEY = "cuda: not measured yet"
SECTION_RE = re.compile(r"<!-- section: (?P<key>.+?) -->\n(?P<body>.*?)<!-- end section -->\n?", re.DOTALL)

PREAMBLE = """\
# fastdet benchmark results

Written by `benchmarks/report.py` from a pytest-benchmark JSON; do not edit by hand. One section per device: a run
replaces the sections of the devices it measured and keeps the others.

**How to read it.** Times are the median of one call (on CUDA including `torch.cuda.synchronize()`). A *speed-up* is
the other implementation's median divided by fastdet's: above 1x fastdet is faster, below 1x it is slower. *Target*
is issue 5's goal for the speed-up over torchvision on that kind of device (goals are recorded here, never asserted
in tests). `—` means not measured: the benchmark was skipped (pytest prints why: torchvision missing, reference
function missing, the Python-loop reference NMS is timed only at each op's smallest size, no kernel for the device
yet). CPU sizes are scaled down where marked, with issue 5's full size in brackets (`SIZES` in
`benchmarks/common.py`). GB/s counts the minimum traffic (inputs read once, output written once).

Reproduce on CPU: `python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json && python
benchmarks/report.py bench.json`. On a GPU machine: `bash benchmarks/run_gpu.sh`.
"""


def section_key(device: str, device_name: str) -> str:
    return f"{device}: {device_name}"


def target_for(device: str, op: str, full_params: dict):
    for rule_device, rule_op, params, goal in TARGETS:
        if rule_device == device and rule_op == op and all(full_params.get(k) == v for k, v in params.items()):
            return goal
    return None


def format_time(seconds) -> str:
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_ratio(ratio) -> str:
    if ratio is None:
        return "—"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def speed_up(other, fastdet):
    return other / fastdet if other is not None and fastdet else None


def _describe_run(data: dict, device: str) -> list[str]:
    machine = data.get("machine_info", {})
    env = machine.get("fastdet", {})
    commit = data.get("commit_info", {}) or {}
    when = data.get("datetime", "")
    try:
        when = dt.datetime.fromisoformat(when).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    versions = [f"torch {env.get('torch', '?')}", f"torchvision {env.get('torchvision') or 'not installed'}",
                f"CUDA {env.get('cuda') or 'none'} (torch build)", f"Python {machine.get('python_version', '?')}"]
    lines = [f"- Measured {when}; " + ", ".join(versions) + "."]
    if device == "cuda":
        lines.append(f"- GPU: {env.get('gpu', '?')} (compute capability {env.get('gpu_capability', '?')}); "
                     f"host CPU: {env.get('cpu', '?')}.")
    else:
        load = env.get("load_average")
        busy = f"; load average when the run started: {load:.1f}" if load is not None else ""
        lines.append(f"- CPU: {env.get('cpu', '?')}; torch threads: {env.get('torch_threads', '?')}{busy}.")
    if commit.get("id"):
        dirty = " with uncommitted changes" if commit.get("dirty") else ""
        lines.append(f"- fastdet commit {commit['id'][:10]} ({commit.get('branch', '?')}){dirty}.")
    return lines


def build_sections(data: dict, note: str | None = None) -> dict[str, str]:
    """Section bodies keyed by device, from one pytest-benchmark JSON."""
    # (device, device_name) -> (op, size) -> impl -> benchmark
    table = defaultdict(lambda: defaultdict(dict))
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "impl" not in info:
            continue  # not one of ours
        table[(info["device"], info["device_name"])][(info["op"], info["size"])][info["impl"]] = bench

    sections = {}
    for (device, name), rows in table.items():
        title = f"## {'GPU' if device == 'cuda' else 'CPU'}: {name}"
        lines = [title, ""] + _describe_run(data, device)
        if note:
            lines.append(f"- {note}")
        lines += [
            "",
            "| op | size | fastdet | torchvision | reference | speed-up vs torchvision (torchvision ÷ fastdet) "
            "| speed-up vs reference (reference ÷ fastdet) | GB/s fastdet / torchvision | target vs torchvision "
            "| result |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        footnotes = {}

        def order(item):
            (op, _), impls = item
            info = next(iter(impls.values()))["extra_info"]
            rank = OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)
            return rank, op, math.prod(info.get("params", {}).values() or [0])

        for (op, size), impls in sorted(rows.items(), key=order):
            info = next(iter(impls.values()))["extra_info"]
            median = {impl: impls[impl]["stats"]["median"] if impl in impls else None for impl in IMPLS}
            fd, tv, ref = median["fastdet"], median["torchvision"], median["reference"]
            size_cell = size if info.get("full_size", size) == size else f"{size} (full: {info['full_size']})"
            op_cell = op
            baseline = impls.get("torchvision", {}).get("extra_info", {}).get("baseline")
            if baseline:
                mark = footnotes.setdefault(baseline, f"({len(footnotes) + 1})")
                op_cell = f"{op} {mark}"
            bandwidth = []
            for impl in ("fastdet", "torchvision"):
                moved = impls.get(impl, {}).get("extra_info", {}).get("bytes")
                bandwidth.append(f"{moved / median[impl] / 1e9:.3g}" if moved and median[impl] else "—")
            gbs = " / ".join(bandwidth) if any(b != "—" for b in bandwidth) else "—"
            goal = target_for(device, op, info.get("full_params", info.get("params", {})))
            ratio_tv = speed_up(tv, fd)
            if goal is None:
                goal_cell, result = "—", "no target"
            elif ratio_tv is None:
                missing = "fastdet" if fd is None else "torchvision"
                goal_cell, result = f"≥{goal:g}x", f"not measured (no {missing} result)"
            else:
                goal_cell = f"≥{goal:g}x"
                result = f"met ({format_ratio(ratio_tv)})" if ratio_tv >= goal else \
                    f"**missed** ({format_ratio(ratio_tv)})"
            lines.append(
                f"| {op_cell} | {size_cell} | {format_time(fd)} | {format_time(tv)} | {format_time(ref)} "
                f"| {format_ratio(ratio_tv)} | {format_ratio(speed_up(ref, fd))} | {gbs} | {goal_cell} | {result} |"
            )
        if footnotes:
            lines.append("")
            lines += [f"{mark} torchvision column: {text}, with the same thresholds and top-k." for text, mark in
                      footnotes.items()]
        sections[section_key(device, name)] = "\n".join(lines) + "\n"
    return sections


def gpu_placeholder() -> str:
    return ("## GPU\n\nNot measured yet: no benchmark run on a GPU has been recorded. `bash benchmarks/run_gpu.sh` on a "
            "machine with a CUDA GPU writes this file with its GPU section added; copy that file over this one.\n")


def merge(existing: str, new_sections: dict[str, str]) -> str:
    sections = {m["key"]: m["body"] for m in SECTION_RE.finditer(existing)}
    sections.update(new_sections)
    has_gpu = any(key.startswith("cuda: ") and key != GPU_PLACEHOLDER_KEY for key in sections)
    if has_gpu:
        sections.pop(GPU_PLACEHOLDER_KEY, None)
    else:
        sections[GPU_PLACEHOLDER_KEY] = gpu_placeholder()

    def order(key):
        return (0 if key.startswith("cuda: ") else 1, key == GPU_PLACEHOLDER_KEY, key)

    parts = [PREAMBLE]
    for key in sorted(sections, key=order):
        parts.append(f"<!-- section: {key} -->\n{sections[key].rstrip()}\n<!-- end section -->\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="output of pytest --benchmark-json")
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT, help="RESULTS.md to write or update")
    parser.add_argument("--note", help="a line added to each section written by this run")
    args = parser.parse_args(argv)

    data = json.loads(args.json.read_text())
    sections = build_sections(data, args.note)
    if not sections:
        print(f"{args.json}: no fastdet benchmarks in it (was it run with --benchmark-disable?)", file=sys.stderr)
        return 1
    existing = args.output.read_text() if args.output.exists() else ""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(merge(existing, sections))
    print(f"wrote {args.output}: " + ", ".join(sorted(sections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
