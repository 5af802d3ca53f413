"""Lightning tasks: loss, metrics and optimisers around the backbones (which know nothing of training).

    ImageClassifier    backbone in ``model``; top-1/top-5 accuracy
    SemanticSegmenter  backbone in ``backbone``, head in ``decode_head``; mIoU and pixel accuracy
    PredictionWriter   ``bilevel predict`` output (CSV or PNG masks)
"""
from .classification import ImageClassifier
from .segmentation import SemanticSegmenter, sliding_window_logits
from .writers import PredictionWriter

__all__ = ["ImageClassifier", "SemanticSegmenter", "PredictionWriter", "sliding_window_logits"]
