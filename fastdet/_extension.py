"""Loading of the compiled module ``fastdet._C``.

Importing ``fastdet._C`` registers every ``torch.ops.fastdet.*`` operator. If that import fails (not built, or built
against another torch), ``import fastdet`` still succeeds, ``fastdet.ops.reference`` keeps working, and the first call
of a native op raises :class:`ExtensionNotAvailableError` with the reason and the rebuild command.
"""

from __future__ import annotations

import torch

REBUILD_HINT = (
    "Rebuild it against the installed torch with `pip install --no-build-isolation -e .` "
    "(add FASTDET_CUDA=0 to skip the CUDA kernels) from the fastdet source folder."
)


class ExtensionNotAvailableError(RuntimeError):
    """The native extension fastdet._C could not be used."""


def _load():
    try:
        from fastdet import _C  # noqa: F401  (import runs the operator registrations)
    except Exception as exc:  # ImportError, or OSError for an undefined symbol from a torch mismatch
        return None, f"fastdet._C could not be imported ({type(exc).__name__}: {exc})."
    built_for = getattr(_C, "torch_version", None)
    running = torch.__version__.split("+")[0]
    if built_for is not None and built_for != running:
        return None, (f"fastdet._C was built for torch {built_for} but torch {running} is installed; "
                      "its operators may not match this torch.")
    return _C, None


_C, LOAD_ERROR = _load()
AVAILABLE = _C is not None
WITH_CUDA = bool(getattr(_C, "with_cuda", 0)) if AVAILABLE else False


def require() -> None:
    """Raise a clear error if the native extension is unusable."""
    if not AVAILABLE:
        raise ExtensionNotAvailableError(f"{LOAD_ERROR} {REBUILD_HINT}")
