"""What the benchmark scripts share: where results go, how a run is described, timing and peak memory."""
from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

RESULTS = Path(__file__).resolve().parent / "results"

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

#: a timed run lasts at least this long (sub-millisecond steps are called several times per run)
MIN_RUN_S = 0.05


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, else an error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


#: an argparse ``type`` for counts and sizes: an integer of at least 1
positive_int = int_at_least(1)


def device_argument(text: str) -> torch.device:
    """An argparse ``type``: ``cpu``, ``cuda`` or ``cuda:N``, a CUDA device only where this machine has it."""
    expected = f"expected cpu, cuda or cuda:N, got {text!r}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(expected) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class BenchmarkParser(argparse.ArgumentParser):
    """An argument parser with ``--quick``: a smoke run that supplies its own values for the options the
    user did not give (:meth:`add_quick_option`); an option given explicitly keeps its value."""

    def __init__(self, *args, quick_help: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._quick_defaults: dict[str, tuple] = {}
        self.add_argument("--quick", action="store_true",
                          help=f"smoke run: {quick_help}; options given explicitly keep their values")

    def add_quick_option(self, *flags: str, default, quick, help: str, **kwargs) -> argparse.Action:
        """An option whose default is ``default``, or ``quick`` under ``--quick``."""
        def shown(value) -> str:
            return " ".join(map(str, value)) if isinstance(value, list) else str(value)
        action = self.add_argument(*flags, default=None, help=f"{help} (default {shown(default)}; --quick: "
                                   f"{shown(quick)})", **kwargs)
        self._quick_defaults[action.dest] = (default, quick)
        return action

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        for dest, (default, quick) in self._quick_defaults.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, quick if parsed.quick else default)
        return parsed, extras


def benchmark_parser(doc: str, outputs: str, repeats: int, repeats_help: str) -> BenchmarkParser:
    """The options every operator benchmark takes: --quick, --out, --repeats and --budget.

    doc: the script's docstring (its first line describes the parser); outputs: the result files, for --out's help.
    """
    parser = BenchmarkParser(description=doc.split("\n")[0], quick_help="one small setting, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {outputs}")
    parser.add_quick_option("--repeats", type=positive_int, default=repeats, quick=1, help=repeats_help)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per measurement at most")
    return parser


def run_metadata(script: str, argv: Optional[list[str]], device: torch.device) -> dict:
    """Command line, UTC date, torch version, thread count and the measured machine of this benchmark run.

    script: the file name under ``benchmarks/``; argv: the arguments (None: ``sys.argv[1:]``); device: where the
    measurements ran (CUDA: the GPU's name; otherwise the processor's description).
    """
    arguments = sys.argv[1:] if argv is None else argv
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
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


def failure_text(error: BaseException) -> str:
    """An error in a table cell: its type and the start of its message's first line."""
    message = str(error).splitlines()[0][:100] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def time_round_robin(steps: dict[str, Callable[[], None]], rounds: int, budget_s: float = math.inf,
                     device: torch.device = torch.device("cpu"), progress: bool = False,
                     failures: Optional[dict[str, str]] = None) -> dict[str, list[Optional[float]]]:
    """Seconds per call of every step, round by round: ``{name: [round 1, ..., round R]}``.

    A warm-up round runs every step (compiling what is compiled) and sets how many calls make one timed
    run (at least ``MIN_RUN_S``). Each following round times every step once, in order, so that a change
    of machine load touches the steps of a round alike. A step whose timed runs took ``budget_s`` sits out
    the rounds after the second (None there). On CUDA every run ends with a synchronisation. ``progress``
    shows a tqdm bar on stderr, one tick per step run, named by round and step. ``failures``: when given, a
    step whose warm-up raises is left out of the rounds (and of the result) and its :func:`failure_text`
    recorded there under its name, so one failing method does not end a run; otherwise the error propagates.
    """
    bar = tqdm(total=len(steps) * (rounds + 1), disable=not progress, file=sys.stderr, unit="step", leave=False)
    calls = {}
    for name, step in steps.items():
        bar.set_description(f"warm-up: {name}")
        try:
            step()
        except Exception as error:  # noqa: BLE001 - reported to the caller when it asked for failures
            if failures is None:
                raise
            failures[name] = failure_text(error)
            bar.update(rounds + 1)
            continue
        synchronize(device)
        tick = time.perf_counter()
        step()
        synchronize(device)
        calls[name] = max(1, math.ceil(MIN_RUN_S / max(time.perf_counter() - tick, 1e-6)))
        bar.update()
    timed = {name: step for name, step in steps.items() if name in calls}
    times: dict[str, list[Optional[float]]] = {name: [] for name in timed}
    spent = dict.fromkeys(timed, 0.0)
    for round_index in range(rounds):
        for name, step in timed.items():
            bar.set_description(f"round {round_index + 1}/{rounds}: {name}")
            if round_index >= 2 and spent[name] > budget_s:
                times[name].append(None)
            else:
                tick = time.perf_counter()
                for _ in range(calls[name]):
                    step()
                synchronize(device)
                elapsed = time.perf_counter() - tick
                spent[name] += elapsed
                times[name].append(elapsed / calls[name])
            bar.update()
    bar.close()
    return times


def fastest(times: list[Optional[float]]) -> float:
    """The fastest of the rounds a step ran."""
    return min(t for t in times if t is not None)


def paired_speedup(baseline: list[Optional[float]], method: list[Optional[float]]) -> Optional[float]:
    """Median, over the rounds both ran, of baseline time / method time within the round.

    Both runs of a pair are seconds apart, so a load that drifts between rounds does not bias the ratio
    (a ratio of two fastest runs can pair a quiet moment with a busy one).
    """
    ratios = [b / m for b, m in zip(baseline, method) if b is not None and m is not None]
    return statistics.median(ratios) if ratios else None
