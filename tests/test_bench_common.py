"""benchmarks/_common.py: the round-robin timer, the paired speed-up, the shared options and the run metadata."""
from __future__ import annotations

import argparse
import importlib.util
import platform

import pytest
import torch

from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("_common", PROJECT_ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_speedup_is_the_median_of_ratios_within_rounds(common):
    baseline = [2.0, 4.0, None, 6.0, 9.0]
    method = [1.0, 1.0, 3.0, 2.0, None]
    assert common.paired_speedup(baseline, method) == 3.0        # rounds 1, 2, 4: ratios 2, 4, 3
    assert common.paired_speedup([None, 1.0], [1.0, None]) is None
    assert common.fastest([None, 3.0, 2.0]) == 2.0


def test_round_robin_runs_every_step_each_round_in_order(common, monkeypatch):
    monkeypatch.setattr(common, "MIN_RUN_S", 0.0)                 # one call per timed run
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    times = common.time_round_robin(steps, rounds=3, budget_s=60.0)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3        # warm-up (two calls each), then rounds
    assert [len(runs) for runs in times.values()] == [3, 3] and all(t is not None for t in times["a"])


def test_round_robin_step_over_budget_sits_out_after_two_rounds(common, monkeypatch):
    monkeypatch.setattr(common, "MIN_RUN_S", 0.0)
    times = common.time_round_robin({"slow": lambda: None}, rounds=4, budget_s=0.0)
    assert all(isinstance(t, float) for t in times["slow"][:2]) and times["slow"][2:] == [None, None]


def test_round_robin_progress_names_rounds_and_steps(common, monkeypatch, capsys):
    monkeypatch.setattr(common, "MIN_RUN_S", 0.0)
    common.time_round_robin({"model_a": lambda: None, "model_b": lambda: None}, rounds=2, progress=True)
    shown = capsys.readouterr().err
    assert "warm-up: model_a" in shown and "round 2/2: model_b" in shown and "/6" in shown
    common.time_round_robin({"model_a": lambda: None}, rounds=1)
    assert capsys.readouterr().err == ""


def test_round_robin_reports_a_failing_step_when_asked(common, monkeypatch):
    monkeypatch.setattr(common, "MIN_RUN_S", 0.0)

    def broken():
        raise RuntimeError("planted failure\nsecond line")
    steps = {"fine": lambda: None, "broken": broken}
    failures = {}
    times = common.time_round_robin(steps, rounds=2, failures=failures)
    assert failures == {"broken": "RuntimeError: planted failure"}
    assert list(times) == ["fine"] and len(times["fine"]) == 2
    with pytest.raises(RuntimeError, match="planted"):
        common.time_round_robin(steps, rounds=2)


@pytest.mark.parametrize("text, message", [("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3"),
                                           ("two", "expected an integer, got 'two'")])
def test_positive_int_rejects_what_is_not_a_positive_integer(common, text, message):
    assert common.positive_int("5") == 5 and common.int_at_least(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        common.positive_int(text)


def test_quick_supplies_only_the_options_not_given(common):
    parser = common.benchmark_parser("Doc.", "files", 9, "rounds")
    assert parser.parse_args([]).repeats == 9
    assert parser.parse_args(["--quick"]).repeats == 1
    assert parser.parse_args(["--quick", "--repeats", "4"]).repeats == 4
    assert "(default 9; --quick: 1)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "0"])


@pytest.mark.parametrize("text", ["gpu", "mps", "cuda:x", "meta"])
def test_device_argument_names_the_accepted_devices(common, text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
        common.device_argument(text)


def test_device_argument_checks_the_cuda_devices_of_the_machine(common, monkeypatch):
    assert common.device_argument("cpu") == torch.device("cpu")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
        common.device_argument("cuda")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    assert common.device_argument("cuda:1") == torch.device("cuda:1")
    with pytest.raises(argparse.ArgumentTypeError, match="2 CUDA device"):
        common.device_argument("cuda:2")


def test_run_metadata_describes_the_measured_device(common, monkeypatch):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "get_device_name", lambda device=None: "Planted GPU")
    cpu = common.run_metadata("bench_x.py", ["--quick"], torch.device("cpu"))
    assert cpu["machine"].startswith(platform.machine()) and "Planted GPU" not in cpu["machine"]
    assert cpu["command"] == "python benchmarks/bench_x.py --quick"
    assert common.run_metadata("bench_x.py", [], torch.device("cuda"))["machine"] == "Planted GPU"
