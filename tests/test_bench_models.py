"""benchmarks/bench_models.py runs end to end (quick mode), writes its results and keeps going past a failing model."""
from __future__ import annotations

import importlib.util
import json

import pytest

from bilevel.runtime import retain_freed_memory
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_models", PROJECT_ROOT / "benchmarks" / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_models_quick_mode_writes_results(bench, tmp_path):
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    assert [row["model"] for row in rows] == ["biformer_tiny [auto]", "biformer_tiny [reference]"]
    assert all(row["eval_images_per_s"] > 0 and row["train_images_per_s"] > 0 for row in rows)
    saved = json.loads((tmp_path / "models_quick.json").read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/bench_models.py") and saved["rows"] == rows
    assert saved["meta"]["allocator"] == retain_freed_memory()
    assert "| biformer_tiny [auto] |" in (tmp_path / "models_quick.md").read_text()


def test_quick_keeps_the_options_given(bench):
    parse = bench.build_parser().parse_args
    quick = parse(["--quick"])
    assert (quick.models, quick.image_size, quick.batch_size, quick.repeats, quick.no_baselines) == \
        (["biformer_tiny"], 64, 1, 1, True)
    given = parse(["--quick", "--models", "crossformer_tiny", "--image-size", "96", "--batch-size", "2",
                   "--repeats", "2"])
    assert (given.models, given.image_size, given.batch_size, given.repeats) == (["crossformer_tiny"], 96, 2, 2)
    full = parse([])
    assert (full.models, full.image_size, full.batch_size, full.repeats, full.no_baselines) == \
        (bench.default_models(), 224, 8, 3, False)


@pytest.mark.parametrize("option, value", [("--repeats", "0"), ("--batch-size", "0"), ("--image-size", "-1"),
                                           ("--models", "no_such_model")])
def test_bad_options_are_refused_before_any_work(bench, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        bench.main([option, value, "--out", str(tmp_path)])
    assert stop.value.code == 2 and f"argument {option}:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failing_model_gets_a_row_and_the_others_are_measured(bench, tmp_path):
    rows = bench.main(["--models", "biformer_tiny", "biformer_stl_nchw", "--no-baselines", "--image-size", "64",
                       "--batch-size", "1", "--repeats", "1", "--out", str(tmp_path)])
    by_model = {row["model"]: row for row in rows}
    failed = by_model["biformer_stl_nchw [auto]"]
    assert failed["error"].startswith("InputSizeError") and failed["eval_images_per_s"] is None
    assert failed["eval_x_reference"] is None
    measured = by_model["biformer_tiny [auto]"]
    assert measured["train_images_per_s"] > 0 and measured["train_x_reference"] > 0 and "error" not in measured
    assert json.loads((tmp_path / "models_cpu.json").read_text())["rows"] == rows
    table = (tmp_path / "models_cpu.md").read_text()
    assert "| biformer_stl_nchw [reference] | – | – | – | – | – | InputSizeError: a 64x64 image" in table


def test_each_variant_is_measured_in_its_own_group_beside_the_baselines(bench, tmp_path, monkeypatch):
    groups = []

    def fake_measure(models, images, repeats, failures):   # seconds per step: the reference 2x, Swin-T 1.5x auto
        groups.append(sorted(models))
        seconds = {"[reference]": 2.0, "swin": 1.5}
        return {f"{label} {kind}": [next((s for key, s in seconds.items() if key in label), 1.0)] * repeats
                for label in models for kind in ("eval", "train")}

    monkeypatch.setattr(bench, "measure", fake_measure)
    rows = bench.main(["--models", "biformer_tiny", "crossformer_tiny", "--image-size", "64", "--batch-size", "2",
                       "--repeats", "2", "--out", str(tmp_path)])
    baselines = ["timm convnext_tiny", "timm swin_tiny_patch4_window7_224"]
    assert groups == [["biformer_tiny [auto]", "biformer_tiny [reference]", *baselines],
                      ["crossformer_tiny", *baselines]]
    by_model = {row["model"]: row for row in rows}
    assert by_model["biformer_tiny [auto]"]["eval_x_reference"] == 2.0
    assert by_model["biformer_tiny [auto]"]["train_x_swin"] == 1.5
    assert by_model["crossformer_tiny"]["train_x_swin"] == 1.5
    assert by_model["timm swin_tiny_patch4_window7_224"]["train_images_per_s"] == 2 / 1.5
