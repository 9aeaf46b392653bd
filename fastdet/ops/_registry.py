"""Helpers for registering Python-side pieces (fake kernels, autograd) of ``fastdet::`` ops.

Registrations only happen when the compiled module loaded: registering a fake kernel for an operator that does not
exist would make ``import fastdet`` fail, which is exactly the failure mode the package must avoid.
"""

from __future__ import annotations

import torch

from fastdet import _extension


def native(name: str):
    """The ``torch.ops.fastdet.<name>`` overload packet, after checking the extension is usable."""
    _extension.require()
    return getattr(torch.ops.fastdet, name)


def register_fake(name: str):
    def decorator(fn):
        if _extension.AVAILABLE:
            torch.library.register_fake(f"fastdet::{name}")(fn)
        return fn

    return decorator


def register_autograd(name: str, backward, setup_context):
    if _extension.AVAILABLE:
        torch.library.register_autograd(f"fastdet::{name}", backward, setup_context=setup_context)
