"""What the benchmark scripts share: where results go, how a run is described, timing and peak memory."""
from __future__ import annotations

import argparse
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


def benchmark_parser(doc: str, outputs: str, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """The options every operator benchmark takes: --quick, --out, --repeats and --budget.

    doc: the script's docstring (its first line describes the parser); outputs: the result files, for --out's help.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small setting, one repeat (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {outputs}")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per measurement at most")
    return parser


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(step: Callable[[], None], device: torch.device = torch.device("cpu")) -> Optional[float]:
    """Memory ``step`` needs at its peak, inputs excluded, in MiB.

    CPU: growth of the resident high-water mark (Linux; None elsewhere). CUDA: growth of the peak of
    allocated memory over what was allocated before the step.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20
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
