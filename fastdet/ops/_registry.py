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


# Libraries holding the autocast kernels registered below; a torch.library.Library unregisters its kernels when it is
# garbage-collected, so they are kept alive here.
_AUTOCAST_LIBRARIES: list = []


def autocast_float32(t):
    """What torch's autocast does to an argument of an op that runs in float32 (``at::autocast::cached_cast(kFloat,
    ...)``): a float16/bfloat16/float32 tensor becomes float32; float64 tensors, integer tensors, None and non-tensors
    pass through."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.float()
    return t


def register_autocast(name: str, kernel) -> None:
    """Register ``kernel(op, *args)`` as the autocast kernel of ``fastdet::<name>`` on the CPU and CUDA (like
    ``torch.library.register_autocast``, which can only cast every input to one dtype and leaves the output alone).

    The kernel runs with that device's autocast key excluded, so ``op(...)`` inside it reaches the real kernel. It is
    registered both with the dispatcher and as a Python kernel of the overload, so eager calls, torch.compile and
    torch.export all see it.
    """
    if not _defined(name):
        return
    op = getattr(torch.ops.fastdet, name).default
    library = torch.library.Library("fastdet", "IMPL")
    _AUTOCAST_LIBRARIES.append(library)
    for device_type in ("cpu", "cuda"):
        if not torch._C._is_autocast_available(device_type):
            continue
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_impl(*args, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return kernel(op, *args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(autocast_impl)
        library.impl(name, lambda _keyset, *args, _impl=autocast_impl: _impl(*args), key_name, with_keyset=True)
