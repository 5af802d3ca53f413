"""benchmarks/_common.py: the round-robin timer and the paired speed-up the benchmark tables report."""
from __future__ import annotations

import importlib.util

import pytest

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
