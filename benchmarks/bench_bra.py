"""Benchmark the BRA attention core: every backend against the reference gather implementation.

For each setting (BiFormer-T stages at 224 px, batch 1 and 8; segmentation stage-1/2 maps at 512 px
and 1024 px; a map of 4-token and one of 1-token regions) the routed attention core
``routed_attention(q, k, v, indices)`` runs with q, k, v of the stage's width and indices from real top-k
routing of the region means, next to two baselines of the same width: dense SDPA over all tokens and
window attention (SDPA inside windows of ``topk * tokens per region`` tokens, the same keys per query as
routing). Measured side by side:

- forward and forward+backward time: the methods of a setting are timed round-robin (one run of each
  per round, after a warm-up round) so that load changes touch them alike; times are the fastest
  round, speed-ups the median over rounds of the ratio within a round;
- peak memory of forward+backward: on CPU, growth of the process's resident-set high-water mark
  (``VmHWM`` in /proc/self/status), reset through /proc/self/clear_refs after ``malloc_trim`` has
  returned freed heap to the system, so the figure is what the step itself needed (inputs excluded);
  on CUDA, growth of the peak allocated memory;
- achieved GFLOP/s of the analytic attention FLOPs (2 per multiply-add, :mod:`bilevel.flops`;
  backward counted as twice the forward), against the machine's fp32 matmul rate measured in the
  same run (before every setting; the fastest measurement counts).

Writes ``bra_<tag>.md``, ``bra_<tag>.json`` and ``bra_<tag>.png`` (tag ``cpu``, ``gpu`` or ``quick``) with
the command, date, torch version and thread count. ``--quick`` runs one small setting once (a smoke run; an
explicit ``--repeats`` is kept).
On CUDA every backend is trained, ``flex`` included (compiled FlexAttention with its block mask); the CPU's
inference chunking is off there (``sdpa``).

    python benchmarks/bench_bra.py                  # full run, a few minutes on 2 cores
    python benchmarks/bench_bra.py --device cuda    # the same on a GPU: bra_gpu.*
    python benchmarks/bench_bra.py --quick --out /tmp/bench
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BenchmarkParser, benchmark_parser, best_seconds, device_argument, fastest,  # noqa: E402
                     paired_speedup, peak_memory_mib, run_metadata, synchronize, time_round_robin)

from bilevel.flops import global_attention_flops, routed_attention_flops
from bilevel.ops.attention import ATTENTION_BACKENDS, routed_attention, select_backend
from bilevel.ops.backends.fused_cpu import fused_cpu_available
from bilevel.ops.backends.triton_fused import triton_available
from bilevel.ops.regions import region_partition
from bilevel.ops.routing import region_affinity, topk_routing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: dense SDPA over all tokens is skipped above this many tokens (minutes per run) ...
DENSE_MAX_TOKENS = 16384
#: ... and dense_mask and flex (eager on CPU: both hold the full token-by-token matrix) above this many
MASK_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Setting:
    name: str
    batch: int
    size: int          # square map side
    dim: int
    heads: int
    n_win: int
    topk: int


SETTINGS = [
    *(Setting(f"224px stage{stage + 1}", batch, size, dim, heads, 7, topk)
      for batch in (1, 8)
      for stage, (size, dim, heads, topk) in enumerate([(56, 64, 2, 1), (28, 128, 4, 4), (14, 256, 8, 16)])),
    Setting("512px stage1", 1, 128, 64, 2, 8, 1),
    Setting("512px stage2", 1, 64, 128, 4, 8, 4),
    Setting("1024px stage1", 1, 256, 64, 2, 16, 1),
    Setting("1024px stage2", 1, 128, 128, 4, 16, 4),
    # regions of a few tokens (a 28² map cut 14 or 28 times per side), where auto's CPU choice must hold too
    Setting("28² map, 4-token regions", 2, 28, 128, 4, 14, 16),
    Setting("28² map, 1-token regions", 2, 28, 128, 4, 28, 16),
]
QUICK_SETTINGS = [Setting("quick 14px", 1, 14, 32, 2, 7, 4)]


@dataclass
class Row:
    setting: str
    batch: int
    method: str
    forward_ms: Optional[float]
    train_ms: Optional[float]          # forward + backward
    peak_mib: Optional[float]          # forward + backward
    gflops_forward: Optional[float]
    gflops_train: Optional[float]
    note: str = ""
    forward_runs: Optional[list] = None   # seconds per call in each timed round (None: sat out the round)
    train_runs: Optional[list] = None


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32
                  ) -> float:
    """The device's matmul rate in ``dtype`` (fp32: TF32 stays off, as in the attention measured)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def product() -> None:
        a @ b
        synchronize(device)
    return 2 * size ** 3 / best_seconds(product, repeats, 5.0) / 1e9


def make_inputs(setting: Setting, generator: torch.Generator, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32):
    """Region-partitioned q, k, v (N, S², T, C) in ``dtype`` and top-k indices (N, S², topk) of a random map,
    on ``device``."""
    shape = (setting.batch, setting.size, setting.size, setting.dim)
    grid = (setting.n_win, setting.n_win)
    q, k, v = (region_partition(torch.randn(shape, generator=generator).to(device, dtype), grid).contiguous()
               for _ in range(3))
    indices = topk_routing(region_affinity(q.mean(dim=2), k.mean(dim=2)), setting.topk).indices
    return q, k, v, indices


def routed_step(backend: str, q, k, v, indices, setting: Setting) -> Callable[[], torch.Tensor]:
    scale = (setting.dim // setting.heads) ** -0.5
    return lambda: routed_attention(q, k, v, indices, scale, setting.heads, backend=backend)


def dense_step(q, k, v, setting: Setting) -> Callable[[], torch.Tensor]:
    """Full attention over all tokens: (N, H, L, D)."""
    def heads(t):
        return t.reshape(setting.batch, -1, setting.heads, setting.dim // setting.heads).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(heads(q), heads(k), heads(v))


def window_width(setting: Setting, tokens_per_region: int) -> int:
    """Tokens per window: as many keys per query as routing gives (``topk`` regions), at most the map."""
    return min(setting.topk * tokens_per_region, setting.size * setting.size)


def window_step(q, k, v, setting: Setting) -> Callable[[], torch.Tensor]:
    """Attention inside windows of :func:`window_width` consecutive tokens (a remainder is left out)."""
    width = window_width(setting, q.shape[2])

    def windows(t):
        tokens = t.reshape(-1, t.shape[-1])
        used = tokens.shape[0] // width * width
        return tokens[:used].reshape(-1, width, setting.heads, setting.dim // setting.heads).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(windows(q), windows(k), windows(v))


@dataclass
class Method:
    """One measured method of a setting: ``make_step(q, k, v)`` returns the step to time."""

    name: str
    make_step: Callable
    flops: int
    trainable: bool = True
    note: str = ""


def training_step(make_step: Callable, q, k, v) -> Callable[[], None]:
    """Forward + backward of ``make_step`` on leaf copies of q, k, v (their gradients dropped after each run)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    step = make_step(*leaves)

    def train() -> None:
        step().sum().backward()
        for leaf in leaves:
            leaf.grad = None
    return train


def measure_round_robin(setting: Setting, methods: list[Method], q, k, v, repeats: int, budget_s: float
                        ) -> list[Row]:
    """Forward and forward+backward times of every method, round-robin (:func:`time_round_robin`), then
    each method's peak memory of forward+backward. A method whose forward or forward+backward fails gets a
    row saying so instead of crashing the run (a lent GPU's minutes are few)."""
    device = q.device
    steps, trains = {}, {}
    for method in methods:
        forward = method.make_step(q, k, v)

        def forward_no_grad(forward=forward) -> None:
            with torch.no_grad():
                forward()
        steps[f"{method.name} forward"] = forward_no_grad
        if method.trainable:
            trains[method.name] = steps[f"{method.name} train"] = training_step(method.make_step, q, k, v)
    failures = {}
    times = time_round_robin(steps, repeats, budget_s, device, progress=True, failures=failures)
    rows = []
    for method in methods:
        failure = failures.get(f"{method.name} forward") or failures.get(f"{method.name} train")
        if failure:
            rows.append(Row(setting.name, setting.batch, method.name, None, None, None, None, None,
                            f"failed: {failure}"))
            continue
        forward_runs = times[f"{method.name} forward"]
        train_runs = times.get(f"{method.name} train")
        train = trains.get(method.name)
        forward_s, train_s = fastest(forward_runs), None if train_runs is None else fastest(train_runs)
        rows.append(Row(setting.name, setting.batch, method.name, 1e3 * forward_s,
                        None if train_s is None else 1e3 * train_s,
                        peak_memory_mib(train, device) if train is not None else None,
                        2 * method.flops / forward_s / 1e9,
                        None if train_s is None else 6 * method.flops / train_s / 1e9, method.note,
                        forward_runs, train_runs))
    return rows


def run_setting(setting: Setting, repeats: int, budget_s: float, device: torch.device,
                dtype: torch.dtype = torch.float32) -> list[Row]:
    q, k, v, indices = make_inputs(setting, torch.Generator().manual_seed(0), device, dtype)
    on_cpu = device.type == "cpu"
    n, regions, tokens, channels = q.shape
    tokens_total = regions * tokens
    flops = routed_attention_flops(n, regions, tokens, setting.topk, tokens, channels, channels)
    methods = []
    for backend in ATTENTION_BACKENDS:
        if tokens_total > MASK_MAX_TOKENS and (backend == "dense_mask" or backend == "flex" and on_cpu):
            continue
        if backend == "triton" and not triton_available(device):   # CUDA (or Triton's interpreter: minutes)
            continue
        if backend == "fused_cpu" and not (on_cpu and dtype == torch.float32 and fused_cpu_available()):
            continue
        cpu_flex = backend == "flex" and on_cpu
        methods.append(Method(backend, lambda q_, k_, v_, b=backend: routed_step(b, q_, k_, v_, indices, setting),
                              flops, trainable=not cpu_flex, note="CPU: eager, forward only" if cpu_flex else ""))
    auto_choice = select_backend(q.detach().requires_grad_(), k.detach().requires_grad_(), indices)
    methods.append(Method("auto", lambda q_, k_, v_: routed_step("auto", q_, k_, v_, indices, setting), flops,
                          note=f"training picks {auto_choice}"))
    if tokens_total <= DENSE_MAX_TOKENS:
        methods.append(Method("dense SDPA", lambda q_, k_, v_: dense_step(q_, k_, v_, setting),
                              global_attention_flops(n, tokens_total, channels), note="all tokens, not routed"))
    width = window_width(setting, tokens)
    methods.append(Method("window SDPA", lambda q_, k_, v_: window_step(q_, k_, v_, setting),
                          (n * tokens_total // width) * width * width * 2 * channels,
                          note=f"windows of {width} tokens"))
    return measure_round_robin(setting, methods, q, k, v, repeats, budget_s)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def summarize(rows: list[Row], matmul_rate: float) -> list[dict]:
    """Rows as dicts with speed-ups and memory ratio against the reference of the same setting."""
    reference = {(row.setting, row.batch): row for row in rows if row.method == "reference"}
    table = []
    for row in rows:
        ref = reference[(row.setting, row.batch)]
        table.append({**asdict(row),
                      "forward_speedup": (paired_speedup(ref.forward_runs, row.forward_runs)
                                          if ref.forward_runs and row.forward_runs else None),
                      "train_speedup": (paired_speedup(ref.train_runs, row.train_runs)
                                        if ref.train_runs and row.train_runs else None),
                      "memory_reduction": _ratio(ref.peak_mib, row.peak_mib),
                      "forward_matmul_fraction": _ratio(row.gflops_forward, matmul_rate),
                      "train_matmul_fraction": _ratio(row.gflops_train, matmul_rate)})
    return table


def _cell(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(table: list[dict], meta: dict) -> str:
    lines = [f"# BRA attention core benchmark ({meta['tag']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}",
             f"- device: {meta['device']}; {meta['dtype']} matmul rate: {meta['matmul_gflops']:.0f} GFLOP/s, the "
             "fastest of "
             f"{len(meta['matmul_gflops_measured'])} measurements, one before each setting "
             f"({min(meta['matmul_gflops_measured']):.0f}–{max(meta['matmul_gflops_measured']):.0f})",
             "- peak memory: growth over forward+backward (inputs excluded; CPU: VmHWM, CUDA: peak allocated); "
             "×: reference / method",
             "- speed-up: median over the timed rounds of reference time / method time within the round; "
             "ms: the fastest round; GFLOP/s of analytic attention FLOPs",
             "", "| setting | batch | method | fwd ms | fwd ×ref | fwd+bwd ms | fwd+bwd ×ref | peak MiB | "
             "mem ×ref | GFLOP/s fwd | % matmul fwd | % matmul fwd+bwd | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(" | ".join([
            f"| {row['setting']}", str(row["batch"]), row["method"], _cell(row["forward_ms"], 2),
            _cell(row["forward_speedup"], 2), _cell(row["train_ms"], 2), _cell(row["train_speedup"], 2),
            _cell(row["peak_mib"], 1), _cell(row["memory_reduction"], 1),
            _cell(row["gflops_forward"], 1), _cell(None if row["forward_matmul_fraction"] is None
                                                    else 100 * row["forward_matmul_fraction"], 0),
            _cell(None if row["train_matmul_fraction"] is None else 100 * row["train_matmul_fraction"], 0),
            row["note"]]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], meta: dict, path: Path) -> None:
    """Two panels: forward+backward speed-up and peak-memory reduction against the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(f"{row['setting']}\nbatch {row['batch']}" for row in table))
    methods = [m for m in dict.fromkeys(row["method"] for row in table) if m != "reference"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(settings)), 8), sharex=True)
    width = 0.8 / len(methods)
    for panel, (key, label) in zip(axes, [("train_speedup", "fwd+bwd speed-up vs reference"),
                                          ("memory_reduction", "peak memory: reference / method")]):
        for i, method in enumerate(methods):
            values = {f"{row['setting']}\nbatch {row['batch']}": row[key] for row in table if row["method"] == method}
            heights = [values.get(s) or 0.0 for s in settings]
            panel.bar([x + i * width for x in range(len(settings))], heights, width, label=method)
        panel.axhline(1.0, color="black", linewidth=0.8)
        panel.set_yscale("log")
        panel.set_ylabel(label)
    axes[0].legend(ncol=4, fontsize=8)
    axes[0].set_title(f"BRA attention core, torch {meta['torch']}, {meta['threads']} threads, {meta['date'][:10]}")
    axes[1].set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], settings, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> BenchmarkParser:
    parser = benchmark_parser(__doc__, "bra_<tag>.md/.json/.png", 9, "timed rounds (after a warm-up round)")
    parser.add_argument("--device", type=device_argument, default="cpu",
                        help="cpu (default), cuda or cuda:N: results bra_gpu.* on CUDA")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="of q, k and v (default float32); another adds its name to the tag (bra_gpu_bfloat16.*)")
    return parser


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    dtype, device, repeats = DTYPES[args.dtype], args.device, args.repeats
    full_tag = "gpu" if device.type == "cuda" else "cpu"
    settings, tag = (QUICK_SETTINGS, "quick") if args.quick else (SETTINGS, full_tag)
    tag += "" if dtype == torch.float32 else f"_{args.dtype}"
    torch.manual_seed(0)
    meta = {"tag": tag, **run_metadata("bench_bra.py", argv, device), "device": str(device), "dtype": args.dtype}
    rows, rates = [], []
    for setting in settings:
        rates.append(matmul_gflops(device, 512 if args.quick else 2048, repeats=repeats, dtype=dtype))
        rows.extend(run_setting(setting, repeats, args.budget, device, dtype))
        print(f"done: {setting.name} batch {setting.batch}", flush=True)
    # the matmul rate is measured before every setting; the fastest one is the reference (a slow
    # measurement under a moment's load would flatter every "% of matmul" figure)
    meta.update(matmul_gflops=max(rates), matmul_gflops_measured=[round(rate, 1) for rate in rates])
    table = summarize(rows, meta["matmul_gflops"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bra_{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    stem.with_suffix(".md").write_text(markdown(table, meta))
    plot(table, meta, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return stem


if __name__ == "__main__":
    main()
