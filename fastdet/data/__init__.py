"""Detection datasets, converters, splits, box-aware transforms and loaders.

Every dataset yields ``(image, target)``: ``image`` is ``Tensor[3, H, W]`` float32 in ``[0, 1]`` and ``target`` holds
``boxes`` (``Tensor[N, 4]`` float32, x1 y1 x2 y2 pixels), ``labels`` (``Tensor[N]`` int64, contiguous 1..K, 0 being
background), ``image_id`` (int) and per-object extras (``area``, ``iscrowd``, ...). See :mod:`fastdet.data._base`.
"""

from fastdet.data._base import (
    OUT_OF_IMAGE_TOLERANCE,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    SkipReport,
)
from fastdet.data.coco import CocoDetection, read_coco, read_coco_dataset, to_coco_dict, write_coco_json
from fastdet.data.convert import FORMATS, ConversionReport, convert_dataset, read_dataset, split_dataset
from fastdet.data.kitti import KITTI_CLASSES, KittiDetection
from fastdet.data.loader import collate_detection, make_data_loader
from fastdet.data.split import split_counts, split_indices
from fastdet.data.synthetic import SHAPE_KINDS, make_shapes_dataset, render_shapes_image
from fastdet.data.transforms import (
    AttachProposals,
    ColorJitter,
    Compose,
    Normalize,
    RandomAffine,
    RandomHorizontalFlip,
    RandomIoUCrop,
    Resize,
)
from fastdet.data.voc import VocDetection
from fastdet.data.yolo import YoloDetection

__all__ = [
    "OUT_OF_IMAGE_TOLERANCE",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "SkipReport",
    "CocoDetection",
    "read_coco",
    "read_coco_dataset",
    "YoloDetection",
    "VocDetection",
    "KittiDetection",
    "KITTI_CLASSES",
    "FORMATS",
    "ConversionReport",
    "convert_dataset",
    "split_dataset",
    "read_dataset",
    "AttachProposals",
    "Compose",
    "Resize",
    "RandomHorizontalFlip",
    "RandomIoUCrop",
    "ColorJitter",
    "RandomAffine",
    "Normalize",
    "to_coco_dict",
    "write_coco_json",
    "collate_detection",
    "make_data_loader",
    "split_counts",
    "split_indices",
    "SHAPE_KINDS",
    "make_shapes_dataset",
    "render_shapes_image",
]
