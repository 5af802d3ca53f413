"""benchmarks/bench_models.py runs end to end (quick mode) and writes its results."""
from __future__ import annotations

import importlib.util
import json

from tests.conftest import PROJECT_ROOT


def test_bench_models_quick_mode_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_models", PROJECT_ROOT / "benchmarks" / "bench_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    assert [row["model"] for row in rows] == ["biformer_tiny [auto]", "biformer_tiny [reference]"]
    assert all(row["eval_images_per_s"] > 0 and row["train_images_per_s"] > 0 for row in rows)
    saved = json.loads((tmp_path / "models_quick.json").read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/bench_models.py") and saved["rows"] == rows
    assert "| biformer_tiny [auto] |" in (tmp_path / "models_quick.md").read_text()
