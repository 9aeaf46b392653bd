"""Exception types that are also what torchvision.ops raises for the same bad argument.

fastdet checks arguments up front and says what is wrong in its own words, usually as a ``ValueError`` or a
``TypeError``. Where torchvision raises something else for the same input (an ``AssertionError`` from its
``torch._assert`` box checks, a ``RuntimeError`` from a kernel check, an ``IndexError`` from indexing a box tensor
with too few coordinates), code written against torchvision catches that type; these classes are both, so such code
keeps working and new code can catch the natural type. README.md ("Exceptions") lists the choices.
"""

from __future__ import annotations

__all__ = [
    "BoxesFormatError",
    "BoxesShapeError",
    "BoxesTypeError",
    "MissingFeatureMapError",
    "TensorShapeError",
    "TensorTypeError",
]


class BoxesFormatError(ValueError, AssertionError):
    """Malformed ``boxes`` for the RoI ops (not ``Tensor[K, 5]`` / a list of ``Tensor[L, 4]``); torchvision asserts."""


class BoxesTypeError(TypeError, AssertionError):
    """``boxes`` for the RoI ops is neither a tensor nor a list of tensors; torchvision asserts."""


class BoxesShapeError(ValueError, IndexError):
    """Boxes without 4 coordinates in the last dimension; torchvision's indexing raises IndexError."""


class MissingFeatureMapError(ValueError, IndexError):
    """MultiScaleRoIAlign's input holds none of its feature maps; torchvision fails indexing the empty list."""


class TensorShapeError(ValueError, RuntimeError):
    """A tensor or size of the wrong shape where torchvision's kernel raises RuntimeError."""


class TensorTypeError(TypeError, RuntimeError):
    """An argument of the wrong dtype or type where torchvision's kernel (or schema) raises RuntimeError."""
