"""Options of benchmarks/bench_train.py, bench_bra.py and routing_on_object.py: bad values are refused before any
work, --quick keeps what was given, and routing_on_object.py records its run like the other benchmarks."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import PROJECT_ROOT


@pytest.fixture
def load(monkeypatch):
    """Loads a script of benchmarks/ as a module (registered while the test runs: its dataclasses need it)."""
    def load_script(script: str):
        spec = importlib.util.spec_from_file_location(script, PROJECT_ROOT / "benchmarks" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, script, module)
        spec.loader.exec_module(module)
        return module
    return load_script


def refusal(main, argv: list[str], capsys) -> str:
    """The error message of ``main(argv)``, which must stop with status 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "foo"], "argument --tasks: invalid choice: 'foo'"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be at least 1, got -2"),
    (["--image-size", "0"], "argument --image-size: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
])
def test_bench_train_refuses_bad_options(load, tmp_path, capsys, argv, message):
    assert message in refusal(load("bench_train").main, [*argv, "--out", str(tmp_path)], capsys)
    assert not list(tmp_path.iterdir())


def test_bench_train_quick_keeps_the_options_given(load):
    parse = load("bench_train").build_parser().parse_args
    quick = parse(["--quick"])
    assert (quick.image_size, quick.batch_size, quick.steps, quick.workers) == (64, 2, 1, 0)
    given = parse(["--quick", "--image-size", "96", "--batch-size", "4", "--steps", "2", "--workers", "1"])
    assert (given.image_size, given.batch_size, given.steps, given.workers) == (96, 4, 2, 1)
    full = parse([])
    assert (full.image_size, full.batch_size, full.steps, full.workers, full.tasks) == \
        (224, 8, 3, 2, ["classification", "segmentation"])


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x"])
def test_bench_bra_refuses_an_unknown_device(load, tmp_path, capsys, device):
    message = refusal(load("bench_bra").main, ["--device", device, "--out", str(tmp_path)], capsys)
    assert f"argument --device: expected cpu, cuda or cuda:N, got '{device}'" in message
    assert not list(tmp_path.iterdir())


def test_bench_bra_refuses_zero_repeats(load, tmp_path, capsys):
    message = refusal(load("bench_bra").main, ["--quick", "--repeats", "0", "--out", str(tmp_path)], capsys)
    assert "argument --repeats: must be at least 1, got 0" in message


def test_routing_on_object_names_a_missing_checkpoint(load, tmp_path, capsys):
    message = refusal(load("routing_on_object").main, ["--checkpoint", "/nonexistent", "--out", str(tmp_path)],
                      capsys)
    assert "--checkpoint /nonexistent: checkpoint file not found" in message
    assert not list(tmp_path.iterdir())


def test_routing_on_object_records_its_run(load, tmp_path, monkeypatch):
    script = load("routing_on_object")
    layer = {"queries": 3, "routed": 0.6, "chance": 0.3, "ratio": 2.0, "topk": 4, "regions": 49}
    monkeypatch.setattr(script, "measure", lambda checkpoint, pictures: {
        "model": "planted", "pictures": pictures, "on_object_threshold": 0.5, "layers": {"stage 0 layer 0": layer}})
    script.main(["--pictures", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "routing_on_object.json").read_text())
    assert result["command"] == f"python benchmarks/routing_on_object.py --pictures 2 --out {tmp_path}"
    assert result["torch"] == script.torch.__version__ and result["threads"] == script.torch.get_num_threads()
    assert result["machine"] and result["pictures"] == 2
    assert f"threads, {result['machine']}" in (tmp_path / "routing_on_object.md").read_text()
