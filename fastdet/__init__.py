"""fastdet: fast, torchvision-compatible kernels for object detection."""

from fastdet import ops
from fastdet._extension import AVAILABLE as extension_available
from fastdet._extension import ExtensionNotAvailableError

__version__ = "0.1.0"
__all__ = ["ops", "extension_available", "ExtensionNotAvailableError", "__version__"]
