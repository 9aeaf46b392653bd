"""torchvision-compatible detection ops backed by fastdet's native kernels.

Each op family lives in its own module, which lists its public names in ``__all__``; this package re-exports them.
Adding a family means adding one import line and one ``__all__`` entry below.
"""

from fastdet.ops import anchors as _anchors
from fastdet.ops import box_coder as _box_coder
from fastdet.ops import boxes as _boxes
from fastdet.ops import losses as _losses
from fastdet.ops import masks as _masks
from fastdet.ops import nms as _nms
from fastdet.ops import rotated as _rotated
from fastdet.ops import roi as _roi
from fastdet.ops.anchors import *  # noqa: F401,F403
from fastdet.ops.box_coder import *  # noqa: F401,F403
from fastdet.ops.boxes import *  # noqa: F401,F403
from fastdet.ops.losses import *  # noqa: F401,F403
from fastdet.ops.masks import *  # noqa: F401,F403
from fastdet.ops.nms import *  # noqa: F401,F403
from fastdet.ops.rotated import *  # noqa: F401,F403
from fastdet.ops.roi import *  # noqa: F401,F403

__all__ = sorted(
    [
        *_anchors.__all__,
        *_box_coder.__all__,
        *_boxes.__all__,
        *_losses.__all__,
        *_masks.__all__,
        *_nms.__all__,
        *_rotated.__all__,
        *_roi.__all__,
    ]
)
