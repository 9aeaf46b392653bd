"""``import fastdet`` must survive a missing or broken ``fastdet._C``: the reference keeps working and native ops raise
ExtensionNotAvailableError explaining what happened and how to rebuild.

Each scenario runs in a fresh interpreter (the real extension is already loaded in this one, and torch cannot
unregister operators), with the failure injected before fastdet is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastdet

REPO_ROOT = Path(fastdet.__file__).resolve().parent.parent

# Python run before `import fastdet` in the child, one per way the compiled module can be unusable.
SCENARIOS = {
    # Never built: the import machinery finds no fastdet._C. A None entry in sys.modules makes the import fail with
    # ImportError exactly as a missing module would, without touching the files on disk.
    "not-built": (
        "import sys; sys.modules['fastdet._C'] = None",
        "fastdet._C could not be imported (ModuleNotFoundError",
    ),
    # Built against another torch: loading the shared object fails with an undefined C++ symbol (an OSError / an
    # ImportError carrying the dynamic loader's message). A meta-path finder raises it for fastdet._C only.
    "abi-mismatch": (
        textwrap.dedent(
            """
            import sys
            class _BrokenBinary:
                def find_spec(self, name, path=None, target=None):
                    if name == "fastdet._C":
                        raise OSError("fastdet/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
                    return None
            sys.meta_path.insert(0, _BrokenBinary())
            """
        ),
        "fastdet._C could not be imported (OSError: fastdet/_C.so: undefined symbol",
    ),
    # Imports, but is a build from before the stable ABI (it carries the one torch it was built for, not the oldest
    # torch it supports): its operators may not match this package.
    "stale-build": (
        textwrap.dedent(
            """
            import sys, types
            stale = types.ModuleType("fastdet._C")
            stale.torch_version = "1.0.0"
            sys.modules["fastdet._C"] = stale
            """
        ),
        "fastdet._C was built for torch 1.0.0 only",
    ),
    # A stable-ABI build whose oldest supported torch is newer than the running one.
    "needs-newer-torch": (
        textwrap.dedent(
            """
            import sys, types
            future = types.ModuleType("fastdet._C")
            future.min_torch_version = "99.0"
            sys.modules["fastdet._C"] = future
            """
        ),
        "fastdet._C needs torch >= 99.0",
    ),
}

CHILD = textwrap.dedent(
    """
    import json
    import torch

    import fastdet
    from fastdet.ops import reference

    report = {"file": fastdet.__file__, "available": fastdet.extension_available}
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    report["reference_iou"] = reference.box_iou(boxes, boxes).tolist()
    report["reference_nms"] = reference.nms(boxes, torch.tensor([0.9, 0.8]), 0.1).tolist()
    # the pure-Python utilities do not need the extension either
    report["area"] = fastdet.ops.box_area(boxes).tolist()
    report["errors"] = {}
    for name in ("box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou"):
        try:
            getattr(fastdet.ops, name)(boxes, boxes)
        except Exception as exc:
            report["errors"][name] = [type(exc).__name__, isinstance(exc, fastdet.ExtensionNotAvailableError),
                                      isinstance(exc, RuntimeError), str(exc)]
        else:
            report["errors"][name] = None
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_import_without_a_usable_extension(scenario):
    inject, expected_reason = SCENARIOS[scenario]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", inject + "\n" + CHILD],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"import fastdet failed in the child:\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report from the child:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads(lines[-1].removeprefix("REPORT "))

    assert Path(report["file"]).resolve() == Path(fastdet.__file__).resolve(), "the child imported another fastdet"
    assert report["available"] is False
    assert report["reference_iou"][0] == pytest.approx([1.0, 1 / 7])
    assert report["reference_nms"] == [0]
    assert report["area"] == [4.0, 4.0]
    for name, error in report["errors"].items():
        assert error is not None, f"fastdet.ops.{name} ran without the extension"
        type_name, is_extension_error, is_runtime_error, message = error
        assert is_extension_error, f"{name} raised {type_name}, not ExtensionNotAvailableError: {message}"
        assert is_runtime_error, "ExtensionNotAvailableError should stay a RuntimeError subclass"
        assert expected_reason in message, f"the message does not say what happened: {message}"
        assert "pip install --no-build-isolation -e ." in message, f"the message does not say how to rebuild: {message}"


def test_test_session_refuses_a_broken_build():
    """conftest stops the whole pytest session with a non-zero status when the extension did not load, so a CI run
    on a broken build cannot come out green (e.g. with every native test skipped)."""
    runner = (
        "import sys; sys.modules['fastdet._C'] = None\n"
        "import pytest\n"
        f"sys.exit(pytest.main([{str(Path(__file__).resolve())!r}, '--collect-only', '-q', '-p', 'no:cacheprovider']))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", runner], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the session passed on a broken build:\n{output}"
    assert "fastdet's native extension is not usable" in output and "could not be imported" in output, output
