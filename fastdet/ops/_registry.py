"""Helpers for registering Python-side pieces (fake kernels, autograd) of ``fastdet::`` ops.

Registrations only happen for operators the compiled module really defines: registering a fake kernel for an operator
that does not exist raises, and ``import fastdet`` must never fail. An operator can be missing when the extension did
not load at all, or when it is a stale build from an older checkout; either way the op's wrapper raises
:class:`fastdet.ExtensionNotAvailableError` with the reason and the rebuild command when called.
"""

from __future__ import annotations

import torch

from fastdet import _extension


# name -> whether fastdet._C defines fastdet::<name>. Filled when the op's fake kernel is registered at import, so
# that under torch.compile the check in native() is a plain dictionary lookup that Dynamo constant-folds.
_DEFINED: dict[str, bool] = {}


def _defined(name: str) -> bool:
    if name not in _DEFINED:
        found = _extension.AVAILABLE
        if found:
            try:
                torch._C._dispatch_find_schema_or_throw(f"fastdet::{name}", "")
            except RuntimeError:
                found = False
        _DEFINED[name] = found
    return _DEFINED[name]


def native(name: str):
    """The ``torch.ops.fastdet.<name>`` overload packet, after checking the extension is usable."""
    _extension.require()
    if not _defined(name):
        raise _extension.ExtensionNotAvailableError(
            f"fastdet._C does not define the operator fastdet::{name}: the compiled module is older than the Python "
            f"package (a stale build). {_extension.REBUILD_HINT}"
        )
    return getattr(torch.ops.fastdet, name)


def register_fake(name: str):
    def decorator(fn):
        if _defined(name):
            torch.library.register_fake(f"fastdet::{name}")(fn)
        return fn

    return decorator


def register_autograd(name: str, backward, setup_context):
    if _defined(name):
        torch.library.register_autograd(f"fastdet::{name}", backward, setup_context=setup_context)
