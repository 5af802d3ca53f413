"""``bilevel fit / predict / fit --ckpt_path`` for classification, through the real command."""
from __future__ import annotations

import csv
import functools
import shutil
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import bilevel
from bilevel import cli
from bilevel.cli import main
from bilevel.data import ShapesClassificationDataModule, read_image
from bilevel.models.loading import CheckpointError, read_checkpoint

from .conftest import CONFIGS, QUICK, column, read_metrics, run_bilevel

CONFIG = str(CONFIGS / "quickstart_classification.yaml")
RUN_DIR = Path("lightning_logs/quickstart_classification")


def _probabilities_in_process(checkpoint: Path, paths: list[str], cache: Path) -> np.ndarray:
    """Class probabilities of the checkpoint's backbone, rebuilt by the library loader alone."""
    hparams = read_checkpoint(checkpoint)["hyper_parameters"]
    model = bilevel.create_model(hparams["model_name"], checkpoint_path=checkpoint, **hparams["model_kwargs"]).eval()
    transform = ShapesClassificationDataModule(root=str(cache), model_name=hparams["model_name"]).transform(False)
    images = torch.stack([transform(read_image(path)) for path in paths])
    with torch.no_grad():
        return torch.softmax(model(images), dim=-1).numpy()


def test_fit_learns_predict_matches_checkpoint_and_resume_continues(tmp_path, bilevel_cache):
    run_bilevel(["fit", "--config", CONFIG, "--trainer.max_epochs", "2"], tmp_path, bilevel_cache)
    first = tmp_path / RUN_DIR / "version_0"
    rows = read_metrics(first)
    losses, accuracy = column(rows, "train/loss"), column(rows, "val/acc1")
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert accuracy[-1] > 0.5, f"validation top-1 {accuracy} is not above chance (0.25)"
    checkpoint = first / "checkpoints" / "last.ckpt"
    assert list((first / "checkpoints").glob("best-*.ckpt")), "no best checkpoint written"
    saved = read_checkpoint(checkpoint)
    assert saved["hyper_parameters"]["class_names"] == ["circle", "cross", "square", "triangle"]

    run_bilevel(["predict", "--config", CONFIG, "--ckpt_path", str(checkpoint)], tmp_path, bilevel_cache)
    [table] = (tmp_path / RUN_DIR).glob("version_*/predictions/predictions.csv")
    with open(table, newline="") as handle:
        predicted = list(csv.DictReader(handle))
    assert len(predicted) == 48
    names = saved["hyper_parameters"]["class_names"]
    written = np.array([[float(row[name]) for name in names] for row in predicted])
    expected = _probabilities_in_process(checkpoint, [row["path"] for row in predicted], bilevel_cache)
    np.testing.assert_allclose(written, expected, atol=1e-4)
    assert [row["label"] for row in predicted] == [names[i] for i in expected.argmax(1)]

    steps_per_epoch = saved["global_step"] // 2
    run_bilevel(["fit", "--config", CONFIG, "--trainer.max_epochs", "3", "--ckpt_path", str(checkpoint)],
                tmp_path, bilevel_cache)
    [resumed] = [path for path in (tmp_path / RUN_DIR).glob("version_*/checkpoints/last.ckpt")
                 if path != checkpoint]
    resumed_state = read_checkpoint(resumed)
    assert resumed_state["epoch"] == 2
    assert resumed_state["global_step"] == saved["global_step"] + steps_per_epoch
    resumed_steps = [int(row["step"]) for row in read_metrics(resumed.parents[1]) if row.get("train/loss")]
    assert min(resumed_steps) >= saved["global_step"]


def test_ddp_two_processes_on_a_user_folder_agrees_with_one_process(tmp_path, bilevel_cache):
    """DDP (gloo, 2 CPU processes) fits a plain image folder; its metrics match a single-process validation and
    its predictions the library's."""
    root = bilevel.data.builtin_shapes(bilevel_cache) / "classification"
    data = ["--data", "bilevel.data.ImageFolderDataModule", "--data.root", str(root), "--data.batch_size", "8"]
    run_bilevel(["fit", "--config", CONFIG, *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                 "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"],
                tmp_path, bilevel_cache)
    ddp_dir = tmp_path / RUN_DIR / "version_0"
    ddp = read_metrics(ddp_dir)
    checkpoint = ddp_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(checkpoint)["global_step"] == 4

    run_bilevel(["validate", "--config", CONFIG, *data, "--ckpt_path", str(checkpoint)], tmp_path, bilevel_cache)
    single = read_metrics(tmp_path / RUN_DIR / "version_1")
    # the two ranks' halves of the 48 validation images, synced, give the one-process figures
    # (one image may flip on rounding between thread layouts)
    ddp_acc, single_acc = column(ddp, "val/acc1")[-1], column(single, "val/acc1")[-1]
    assert abs(ddp_acc - single_acc) <= 1 / 48 + 1e-6, (ddp_acc, single_acc)
    np.testing.assert_allclose(column(ddp, "val/loss")[-1], column(single, "val/loss")[-1], rtol=1e-3)

    # predict in 2 processes: one predictions.csv, in the dataset's order, equal to the library's probabilities
    run_bilevel(["predict", "--config", CONFIG, *data, "--ckpt_path", str(checkpoint), "--trainer.accelerator", "cpu",
                 "--trainer.strategy", "ddp", "--trainer.devices", "2"], tmp_path, bilevel_cache)
    folder = tmp_path / RUN_DIR / "version_2" / "predictions"
    assert sorted(path.name for path in folder.iterdir()) == ["predictions.csv"]
    with open(folder / "predictions.csv", newline="") as handle:
        predicted = list(csv.DictReader(handle))
    paths = [row["path"] for row in predicted]
    assert paths == sorted(str(path) for path in (root / "val").rglob("*.png"))
    names = read_checkpoint(checkpoint)["hyper_parameters"]["class_names"]
    written = np.array([[float(row[name]) for name in names] for row in predicted])
    np.testing.assert_allclose(written, _probabilities_in_process(checkpoint, paths, bilevel_cache), atol=1e-4)


def test_official_weights_start_a_run_and_are_never_read_again(tmp_path, bilevel_cache):
    """--model.checkpoint_path starts fit; predict and resume with --ckpt_path work once the .pth has moved."""
    start = tmp_path / "official.pth"
    torch.save({"model": bilevel.create_model("biformer_tiny", depth=[1, 1, 1, 1]).state_dict()}, start)
    refused = run_bilevel(["fit", "--config", CONFIG, "--ckpt_path", str(start)], tmp_path, bilevel_cache,
                          should_fail=True)
    assert f"bilevel: error: {start} is not a checkpoint written by `bilevel fit`" in refused.stderr
    assert f"--model.checkpoint_path {start}" in refused.stderr
    assert refused.returncode == 2 and "Traceback" not in refused.stderr

    quick_fit = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    run_bilevel(["fit", "--config", CONFIG, "--model.checkpoint_path", str(start), *quick_fit], tmp_path,
                bilevel_cache)
    checkpoint = tmp_path / RUN_DIR / "version_0" / "checkpoints" / "last.ckpt"
    start.rename(tmp_path / "moved.pth")

    # the same images under other class-folder names: predictions keep the checkpoint's class names
    renamed = tmp_path / "renamed"
    shutil.copytree(bilevel.data.builtin_shapes(bilevel_cache) / "classification", renamed)
    for split in ("train", "val"):
        for folder in (renamed / split).iterdir():
            folder.rename(folder.with_name(f"kind_{folder.name}"))
    run_bilevel(["predict", "--config", CONFIG, "--model.checkpoint_path", str(start), "--ckpt_path",
                 str(checkpoint), "--data", "bilevel.data.ImageFolderDataModule", "--data.root", str(renamed)],
                tmp_path, bilevel_cache)
    [table] = (tmp_path / RUN_DIR).glob("version_*/predictions/predictions.csv")
    with open(table, newline="") as handle:
        header = next(csv.reader(handle))
    assert header[3:] == read_checkpoint(checkpoint)["hyper_parameters"]["class_names"]

    run_bilevel(["fit", "--config", CONFIG, "--model.checkpoint_path", str(start), "--ckpt_path", str(checkpoint),
                 "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"], tmp_path, bilevel_cache)
    resumed = [path for path in (tmp_path / RUN_DIR).glob("version_*/checkpoints/last.ckpt") if path != checkpoint]
    assert [read_checkpoint(path)["global_step"] for path in resumed] == [3]


def test_predict_keeps_no_predictions_in_memory_unless_asked(tmp_path, monkeypatch, bilevel_cache):
    """The PredictionWriter writes every batch to disk; the trainer holds the predictions only when asked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    asked = []

    @functools.wraps(lightning.Trainer.predict)      # the CLI builds its options from the signature
    def recording_predict(trainer, **kwargs):
        asked.append(kwargs["return_predictions"])

    monkeypatch.setattr(lightning.Trainer, "predict", recording_predict)
    main(["predict", "--config", CONFIG, *QUICK])
    main(["predict", "--config", CONFIG, "--return_predictions", "true", *QUICK])
    assert asked == [False, True]


def _lightning_checkpoint(path: Path, class_path: str, class_names: list[str]) -> Path:
    """A checkpoint as `bilevel fit` writes it, as far as the checks before restoring read it (no weights)."""
    torch.save({"pytorch-lightning_version": lightning.__version__, "state_dict": {},
                "hyper_parameters": {"_class_path": class_path, "num_classes": len(class_names),
                                     "class_names": class_names}}, path)
    return path


def test_a_checkpoint_of_another_task_or_class_count_is_refused_before_restoring(tmp_path, monkeypatch,
                                                                                 bilevel_cache):
    """Refused before Lightning takes the checkpoint's model class, or fails on its weights' shapes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    segmenter = _lightning_checkpoint(tmp_path / "seg.ckpt", "bilevel.tasks.SemanticSegmenter", ["sky", "road"])
    with pytest.raises(CheckpointError, match=f"{segmenter} is a checkpoint of SemanticSegmenter with 2 classes "
                                              "\\(sky, road\\), but this run's model is ImageClassifier"):
        main(["predict", "--config", CONFIG, "--ckpt_path", str(segmenter), *QUICK])
    three = _lightning_checkpoint(tmp_path / "three.ckpt", "bilevel.tasks.ImageClassifier", ["a", "b", "c"])
    with pytest.raises(CheckpointError, match=f"{three} is a checkpoint of ImageClassifier with 3 classes "
                                              "\\(a, b, c\\), but the data gives 4 classes "
                                              "\\(circle, cross, square, triangle\\)"):
        main(["predict", "--config", CONFIG, "--ckpt_path", str(three), *QUICK])
    with pytest.raises(CheckpointError, match="--ckpt_path missing.ckpt: no such file or folder"):
        main(["predict", "--config", CONFIG, "--ckpt_path", "missing.ckpt", *QUICK])


def test_the_embedded_demo_checkpoint_predicts_through_lightning_and_is_refused_for_resuming(tmp_path, monkeypatch,
                                                                                             bilevel_cache):
    """A file exported for serving still loads with Lightning (``load_from_checkpoint``, ``predict --ckpt_path``);
    a config without a prediction writer still writes the predictions; resuming from it is refused in one line."""
    from bilevel.serving import EMBEDDED_CHECKPOINT, EMBEDDED_SEGMENTATION_CHECKPOINT
    from bilevel.tasks import ImageClassifier, SemanticSegmenter

    demo = str(CONFIGS / "demo_classification.yaml")
    assert "PredictionWriter" not in Path(demo).read_text()
    run_bilevel(["predict", "--config", demo, "--ckpt_path", str(EMBEDDED_CHECKPOINT),
                 "--trainer.limit_predict_batches", "1"], tmp_path, bilevel_cache)
    [table] = (tmp_path / "lightning_logs/demo_classification").glob("version_*/predictions/predictions.csv")
    with open(table, newline="") as handle:
        predicted = list(csv.DictReader(handle))
    names = read_checkpoint(EMBEDDED_CHECKPOINT)["hyper_parameters"]["class_names"]
    written = np.array([[float(row[name]) for name in names] for row in predicted])
    expected = _probabilities_in_process(EMBEDDED_CHECKPOINT, [row["path"] for row in predicted], bilevel_cache)
    assert len(predicted) == 16
    np.testing.assert_allclose(written, expected, atol=1e-4)

    assert isinstance(ImageClassifier.load_from_checkpoint(EMBEDDED_CHECKPOINT), ImageClassifier)
    assert isinstance(SemanticSegmenter.load_from_checkpoint(EMBEDDED_SEGMENTATION_CHECKPOINT), SemanticSegmenter)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    with pytest.raises(CheckpointError, match=f"{EMBEDDED_CHECKPOINT} holds a model's weights without the training "
                                              f"state .* pass --model.checkpoint_path {EMBEDDED_CHECKPOINT}$"):
        main(["fit", "--config", demo, "--ckpt_path", str(EMBEDDED_CHECKPOINT), *QUICK])


def test_ckpt_path_last_resumes_the_newest_earlier_run(tmp_path, monkeypatch, bilevel_cache):
    """Each run logs into its own version_<n> folder, where Lightning's own search for ``last`` finds nothing: the
    newest earlier run's last.ckpt is taken, and with none a one-line error says so (not a silent fresh start)."""
    short = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(bilevel_cache))
    with pytest.raises(CheckpointError, match="--ckpt_path last: no earlier run under .*quickstart_classification"):
        main(["fit", "--config", CONFIG, "--ckpt_path", "last", *short, *QUICK])
    for epochs in ("1", "2"):
        run_bilevel(["fit", "--config", CONFIG, "--trainer.max_epochs", epochs, *short], tmp_path, bilevel_cache)
    resumed = run_bilevel(["fit", "--config", CONFIG, "--trainer.max_epochs", "3", "--ckpt_path", "last", *short],
                          tmp_path, bilevel_cache)
    newest = RUN_DIR / "version_1" / "checkpoints" / "last.ckpt"
    assert f"Restored all states from the checkpoint at {newest}" in resumed.stdout + resumed.stderr
    assert read_checkpoint(tmp_path / RUN_DIR / "version_2" / "checkpoints" / "last.ckpt")["epoch"] == 2


def test_last_ckpt_holds_the_final_epoch_when_the_metric_stops_improving(tmp_path, bilevel_cache):
    """A monitored callback rewrites its last.ckpt only when its metric improves (Lightning 2.6), which left the best
    epoch there: the config's unmonitored ``last`` checkpoint keeps the latest state, to resume where a run stopped.
    Here the monitored callback watches the epoch number for a minimum, so the first epoch stays the best."""
    settings = yaml.safe_load(Path(CONFIG).read_text())
    [monitored] = [callback["init_args"] for callback in settings["trainer"]["callbacks"]
                   if callback.get("init_args", {}).get("monitor")]
    monitored.update(monitor="epoch", mode="min")
    config = tmp_path / "never_improves.yaml"
    config.write_text(yaml.safe_dump(settings))
    short = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    run_bilevel(["fit", "--config", str(config), "--trainer.max_epochs", "3", *short], tmp_path, bilevel_cache)
    checkpoints = tmp_path / RUN_DIR / "version_0" / "checkpoints"
    assert [path.name for path in checkpoints.glob("best-*.ckpt")] == ["best-epoch=00.ckpt"]
    last = read_checkpoint(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)


class _Unreadable(torch.utils.data.Dataset):
    def __init__(self, path: Path):
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return read_image(self.path)


def test_an_image_unreadable_in_a_loader_worker_is_one_line_of_error(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.bmp"
    broken.write_bytes(b"BM" + bytes(100))
    monkeypatch.setattr(cli, "main", lambda: next(iter(torch.utils.data.DataLoader(_Unreadable(broken),
                                                                                   num_workers=1))))
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.startswith(f"bilevel: error: {broken}: cannot read this image")
    assert error.count("\n") == 1


def test_a_data_error_found_while_the_data_module_is_made_is_one_line_of_error(tmp_path, monkeypatch, capsys):
    """jsonargparse re-raises an error of the data module's constructor as a ValueError about "Union subtypes": the
    command still reports the data module's own message, as it does for errors found later."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "cat" / "0.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bilevel", "fit", "--config", CONFIG, "--data.root", str(root), *QUICK,
                                      "--data", "bilevel.data.ImageFolderDataModule"])
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in error and "Union" not in error
    assert error.splitlines()[-1].startswith(f"bilevel: error: {root}: only one class folder (cat)")
