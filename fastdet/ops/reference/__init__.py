"""Pure-PyTorch reference implementations of fastdet's ops: the test oracle.

Readable, differentiable through plain autograd, independent of the native extension (they work when ``fastdet._C``
failed to load) and of torchvision. Nothing here calls ``torch.ops.fastdet``.
"""

from fastdet.ops.reference import anchors as _anchors
from fastdet.ops.reference import box_coder as _box_coder
from fastdet.ops.reference import boxes as _boxes
from fastdet.ops.reference import losses as _losses
from fastdet.ops.reference import masks as _masks
from fastdet.ops.reference import matrix_nms as _matrix_nms
from fastdet.ops.reference import nms as _nms
from fastdet.ops.reference import roi as _roi
from fastdet.ops.reference import roi_spp as _roi_spp
from fastdet.ops.reference import selective_search as _selective_search
from fastdet.ops.reference import soft_nms as _soft_nms
from fastdet.ops.reference import wbf as _wbf
from fastdet.ops.reference import rotated as _rotated
from fastdet.ops.reference.anchors import *  # noqa: F401,F403
from fastdet.ops.reference.box_coder import *  # noqa: F401,F403
from fastdet.ops.reference.boxes import *  # noqa: F401,F403
from fastdet.ops.reference.losses import *  # noqa: F401,F403
from fastdet.ops.reference.masks import *  # noqa: F401,F403
from fastdet.ops.reference.matrix_nms import *  # noqa: F401,F403
from fastdet.ops.reference.nms import *  # noqa: F401,F403
from fastdet.ops.reference.roi import *  # noqa: F401,F403
from fastdet.ops.reference.roi_spp import *  # noqa: F401,F403
from fastdet.ops.reference.selective_search import *  # noqa: F401,F403
from fastdet.ops.reference.soft_nms import *  # noqa: F401,F403
from fastdet.ops.reference.wbf import *  # noqa: F401,F403
from fastdet.ops.reference.rotated import *  # noqa: F401,F403

__all__ = sorted(
    [
        *_anchors.__all__,
        *_box_coder.__all__,
        *_boxes.__all__,
        *_losses.__all__,
        *_masks.__all__,
        *_matrix_nms.__all__,
        *_nms.__all__,
        *_roi.__all__,
        *_roi_spp.__all__,
        *_selective_search.__all__,
        *_soft_nms.__all__,
        *_wbf.__all__,
        *_rotated.__all__,
    ]
)
