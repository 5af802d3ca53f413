"""Running the real ``bilevel`` command in a subprocess, with the built-in data in a private cache."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = PROJECT_ROOT / "lightning_configs"
# Tiny runs: a few batches per epoch keep each fit within seconds on two cores.
QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="session")
def bilevel_cache(tmp_path_factory) -> Path:
    """A cache folder of this test session (the built-in dataset is generated into it on first use)."""
    return tmp_path_factory.mktemp("bilevel_cache")


def run_bilevel(args: list[str], cwd: Path, cache: Path, timeout: int = 400, should_fail: bool = False,
                test_classes: bool = False) -> subprocess.CompletedProcess:
    """Run ``bilevel <args>`` (the console script of this environment) and fail with its output if it fails
    (or, with ``should_fail``, if it succeeds). test_classes: the tests' own classes (``tests.tasks...``)
    can be named in ``args``."""
    script = Path(sys.executable).with_name("bilevel")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "bilevel.cli"]
    env = dict(os.environ, BILEVEL_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if test_classes:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command + args + QUICK, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if should_fail:
        if result.returncode == 0:
            pytest.fail(f"bilevel {' '.join(args)} succeeded but should have failed:\n{result.stderr[-3000:]}")
        return result
    if result.returncode != 0:
        pytest.fail(f"bilevel {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-6000:]}")
    return result


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger ``metrics.csv``."""
    with open(log_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The non-empty values of one metric, in logging order."""
    return [float(row[name]) for row in rows if row.get(name)]
