"""Loading of the compiled modules ``fastdet._C`` (CPU kernels and the public ops) and ``fastdet._C_cuda`` (CUDA
kernels).

Both use only torch's stable ABI and CPython's limited API, so one build runs on every torch from ``MIN_TORCH`` on and
every CPython from 3.10 on. Importing a module registers its ``torch.ops.fastdet.*`` kernels. ``fastdet._C_cuda``
links torch's CUDA libraries, so it is imported only where torch has CUDA; the CPU ops never depend on it.

If ``fastdet._C`` cannot be used (not built, a broken file, a torch older than ``MIN_TORCH``, a build from before the
stable ABI), ``import fastdet`` still succeeds, ``fastdet.ops.reference`` keeps working, and the first call of a
native op raises :class:`ExtensionNotAvailableError` with the reason and the rebuild command. A CUDA module that does
not load leaves the CPU ops working; the reason is in ``CUDA_LOAD_ERROR``.
"""

from __future__ import annotations

import importlib.util
import re

import torch

# The oldest torch the native code supports: setup.py compiles with TORCH_TARGET_VERSION set to it.
MIN_TORCH = (2, 11)

REBUILD_HINT = (
    "Rebuild it with `pip install --no-build-isolation -e .` (or `pip install .`; add FASTDET_CUDA=0 to skip the "
    "CUDA kernels) from the fastdet source folder."
)


class ExtensionNotAvailableError(RuntimeError):
    """The native extension fastdet._C could not be used."""


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _load():
    running = torch.__version__.split("+")[0]
    if _version_tuple(running) < MIN_TORCH:
        # Checked before loading: registering against a torch without the stable-ABI calls the build relies on
        # could fail inside the dynamic loader with a message that helps nobody.
        return None, (f"fastdet needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (the oldest torch its native code "
                      f"targets), but torch {running} is installed; upgrade torch.")
    try:
        from fastdet import _C  # noqa: F401  (import runs the operator registrations)
    except Exception as exc:  # ImportError, or OSError from the dynamic loader
        return None, f"fastdet._C could not be imported ({type(exc).__name__}: {exc})."
    min_torch = getattr(_C, "min_torch_version", None)
    if min_torch is None:
        built_for = getattr(_C, "torch_version", "an unknown torch")
        return None, (f"fastdet._C was built for torch {built_for} only (a build from before fastdet used torch's "
                      "stable ABI); its operators may not match this package.")
    if _version_tuple(running) < _version_tuple(min_torch):
        return None, (f"fastdet._C needs torch >= {min_torch}, but torch {running} is installed; "
                      "upgrade torch or rebuild fastdet.")
    return _C, None


def _load_cuda():
    if _C is None:
        return None, "fastdet._C is not usable"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if importlib.util.find_spec("fastdet._C_cuda") is None:
        return None, "fastdet was built without CUDA kernels (FASTDET_CUDA=0, or no CUDA toolkit at build time)"
    try:
        from fastdet import _C_cuda  # noqa: F401  (import runs the CUDA kernel registrations)
    except Exception as exc:
        return None, f"fastdet._C_cuda could not be imported ({type(exc).__name__}: {exc})"
    return _C_cuda, None


_C, LOAD_ERROR = _load()
AVAILABLE = _C is not None
_C_cuda, CUDA_LOAD_ERROR = _load_cuda()
WITH_CUDA = _C_cuda is not None


def require() -> None:
    """Raise a clear error if the native extension is unusable."""
    if not AVAILABLE:
        raise ExtensionNotAvailableError(f"{LOAD_ERROR} {REBUILD_HINT}")
