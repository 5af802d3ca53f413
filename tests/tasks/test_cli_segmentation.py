"""``bilevel fit / predict`` for segmentation, through the real command, and serving its checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bilevel.data import builtin_shapes, load_image_tensor
from bilevel.data.images import read_image
from bilevel.serving import Predictor, export_checkpoint, fit_picture, load_served_model
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

    served = load_served_model(checkpoint=checkpoint)
    assert served.task == "segmentation" and served.class_names == tuple(model.hparams.class_names)
    exported = export_checkpoint(checkpoint, tmp_path / "served.ckpt", half=False)
    assert exported.stat().st_size < checkpoint.stat().st_size
    picture = read_image(images_dir / written[0].name)
    with torch.no_grad():
        expected = model(load_image_tensor(images_dir / written[0].name)[None]).argmax(1)[0]
    for source in (checkpoint, exported):
        analysis = Predictor().analyse(load_served_model(checkpoint=source), fit_picture(picture))
        assert torch.equal(analysis.mask, expected), f"served mask of {source.name} differs from the module's"
        assert analysis.records and abs(float(analysis.probabilities.sum()) - 1) < 1e-6
    reloaded = SemanticSegmenter.load_from_checkpoint(exported).eval()    # the exported file still loads with Lightning
    with torch.no_grad():
        assert torch.equal(reloaded(load_image_tensor(images_dir / written[0].name)[None]).argmax(1)[0], expected)
