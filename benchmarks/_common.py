"""What the benchmark scripts share: where results go, how a run is described, timing and peak memory."""
from __future__ import annotations

import ctypes
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def run_metadata(script: str, argv: Optional[list[str]]) -> dict:
    """Command line, UTC date, torch version, thread count and machine of this benchmark run.

    script: the file name under ``benchmarks/``; argv: the arguments (None: ``sys.argv[1:]``).
    """
    arguments = sys.argv[1:] if argv is None else argv
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.machine()} {platform.processor() or platform.system()}")
    return {"command": shlex.join(["python", f"benchmarks/{script}", *arguments]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": machine}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_mib(step: Callable[[], None]) -> Optional[float]:
    """Growth of the resident high-water mark while ``step`` runs (Linux; None elsewhere)."""
    if _LIBC is None:
        return None
    _LIBC.malloc_trim(0)
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")      # reset VmHWM to the current RSS
    step()
    return max(0, _status_kib("VmHWM") - baseline) / 1024


def best_seconds(step: Callable[[], None], repeats: int, budget_s: float) -> float:
    """Fastest time of ``step`` after one warm-up run, over at most ``repeats`` runs or ``budget_s`` seconds."""
    step()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return min(times)
