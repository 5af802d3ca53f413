"""``bilevel fit / predict`` for segmentation, through the real command."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bilevel.data import builtin_shapes, load_image_tensor
from bilevel.tasks import SemanticSegmenter

from .conftest import CONFIGS, column, read_metrics, run_bilevel

CONFIG = str(CONFIGS / "quickstart_segmentation.yaml")
RUN_DIR = Path("lightning_logs/quickstart_segmentation")


def test_fit_learns_and_predicted_masks_match_the_checkpoint(tmp_path, bilevel_cache):
    run_bilevel(["fit", "--config", CONFIG, "--trainer.max_epochs", "2"], tmp_path, bilevel_cache)
    log_dir = tmp_path / RUN_DIR / "version_0"
    rows = read_metrics(log_dir)
    losses, miou = column(rows, "train/loss"), column(rows, "val/miou")
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    # always predicting the commonest class (background) scores about 0.8 / 5 classes
    assert miou[-1] > 0.3, f"validation mIoU {miou}"
    checkpoint = log_dir / "checkpoints" / "last.ckpt"

    run_bilevel(["predict", "--config", CONFIG, "--ckpt_path", str(checkpoint)], tmp_path, bilevel_cache)
    written = sorted((tmp_path / RUN_DIR).glob("version_*/predictions/masks/*.png"))
    assert len(written) == 48
    model = SemanticSegmenter.load_from_checkpoint(checkpoint).eval()
    assert model.hparams.class_names == ["background", "circle", "square", "triangle", "cross"]
    images_dir = builtin_shapes(bilevel_cache) / "segmentation" / "val" / "images"
    for mask_path in written[:6]:
        image = load_image_tensor(images_dir / mask_path.name)
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == tuple(image.shape[-2:])
        with torch.no_grad():
            expected = model.infer(image[None]).argmax(1)[0].numpy()
        assert (mask == expected).mean() > 0.999
