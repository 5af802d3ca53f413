"""benchmarks/bench_family_ops.py runs end to end (quick mode): every method checked against the official output."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import PROJECT_ROOT


def test_bench_family_ops_quick_mode_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_family_ops",
                                                  PROJECT_ROOT / "benchmarks" / "bench_family_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stem = bench.main(["--quick", "--out", str(tmp_path)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    dbra = [row for row in rows if row["operator"] == "DeBiFormer-T DBRA"]
    cross = [row for row in rows if row["operator"].startswith("CrossFormer-S block")]
    assert [row["stage"] for row in dbra] == [1, 1, 2, 2, 3, 3]
    assert {row["method"] for row in dbra} == {"official", "project"}
    assert {row["operator"] for row in cross} == {"CrossFormer-S block SDA", "CrossFormer-S block LDA"}
    assert {row["method"] for row in cross} == {"official", "project", "fused SDPA"}
    assert all(row["forward_ms"] > 0 and row["train_ms"] > 0 for row in rows)
    assert all(row["forward_speedup"] == 1.0 for row in rows if row["method"] == "official")
    assert stem.with_suffix(".md").read_text().count("| quick 112px |") == len(rows)


def test_bench_family_ops_refuses_zero_repeats_before_any_work(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_family_ops",
                                                  PROJECT_ROOT / "benchmarks" / "bench_family_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--repeats", "0", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "argument --repeats: must be at least 1, got 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
