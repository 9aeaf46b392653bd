"""torchvision-compatible detection ops backed by fastdet's native kernels.

Each op family lives in its own module, which lists its public names in ``__all__``; this package re-exports them.
Adding a family means adding one import line and one ``__all__`` entry below.
"""

from fastdet.ops import anchors as _anchors
from fastdet.ops import box_coder as _box_coder
from fastdet.ops import boxes as _boxes
from fastdet.ops import coco_eval as _coco_eval
from fastdet.ops import losses as _losses
from fastdet.ops import masks as _masks
from fastdet.ops import matrix_nms as _matrix_nms
from fastdet.ops import nms as _nms
from fastdet.ops import onnx as _onnx
from fastdet.ops import rotated as _rotated
from fastdet.ops import roi as _roi
from fastdet.ops import roi_spp as _roi_spp
from fastdet.ops import selective_search as _selective_search
from fastdet.ops import soft_nms as _soft_nms
from fastdet.ops import wbf as _wbf
from fastdet.ops.anchors import *  # noqa: F401,F403
from fastdet.ops.box_coder import *  # noqa: F401,F403
from fastdet.ops.boxes import *  # noqa: F401,F403
from fastdet.ops.coco_eval import *  # noqa: F401,F403
from fastdet.ops.losses import *  # noqa: F401,F403
from fastdet.ops.masks import *  # noqa: F401,F403
from fastdet.ops.matrix_nms import *  # noqa: F401,F403
from fastdet.ops.nms import *  # noqa: F401,F403
from fastdet.ops.onnx import *  # noqa: F401,F403
from fastdet.ops.rotated import *  # noqa: F401,F403
from fastdet.ops.roi import *  # noqa: F401,F403
from fastdet.ops.roi_spp import *  # noqa: F401,F403
from fastdet.ops.selective_search import *  # noqa: F401,F403
from fastdet.ops.soft_nms import *  # noqa: F401,F403
from fastdet.ops.wbf import *  # noqa: F401,F403

__all__ = sorted(
    [
        *_anchors.__all__,
        *_box_coder.__all__,
        *_boxes.__all__,
        *_coco_eval.__all__,
        *_losses.__all__,
        *_masks.__all__,
        *_matrix_nms.__all__,
        *_nms.__all__,
        *_onnx.__all__,
        *_rotated.__all__,
        *_roi.__all__,
        *_roi_spp.__all__,
        *_selective_search.__all__,
        *_soft_nms.__all__,
        *_wbf.__all__,
    ]
)

# ONNX translations register themselves with torch's exporter when it is first loaded (see fastdet/ops/onnx.py).
_onnx.install()
