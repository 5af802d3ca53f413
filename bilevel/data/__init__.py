"""Data: the one image reader, folder data modules, the built-in shapes dataset and the pre-training scan.

    from bilevel.data import ImageFolderDataModule, read_image
    data = ImageFolderDataModule("/path/to/images", model_name="biformer_tiny")   # train/ and val/ class folders
"""
from .classification import ImageFolderDataModule, ShapesClassificationDataModule
from .images import (DatasetError, ImageReadError, check_image, image_to_tensor, list_images, load_image_tensor,
                     read_image, read_mask)
from .segmentation import SegmentationFolderDataModule, ShapesSegmentationDataModule
from .shapes import SEGMENTATION_CLASSES, SHAPE_CLASSES, builtin_shapes, cache_dir

__all__ = [
    "ImageFolderDataModule", "ShapesClassificationDataModule", "SegmentationFolderDataModule",
    "ShapesSegmentationDataModule", "ImageReadError", "DatasetError", "read_image", "read_mask", "check_image",
    "image_to_tensor", "load_image_tensor", "list_images", "builtin_shapes", "cache_dir", "SHAPE_CLASSES",
    "SEGMENTATION_CLASSES",
]
