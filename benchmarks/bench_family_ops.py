"""Benchmark DeBiFormer's DBRA and CrossFormer's grouped attention: the project against the official numerics.

Both operators are the modules of the real models (DeBiFormer-T's DBRA, one per stage; CrossFormer-S's
SDA and LDA blocks, one of each per stage; the models' initial weights), run on NHWC maps of each
stage's size at 224 px (batch 1 and 8; stages 1-3) and 512 px (batch 1; stages 1-2):

- DBRA: the project's module (routed attention ``backend="auto"``, SDPA for the deformable attention)
  against the official formulation (reference gather for the routed attention, explicit
  softmax(q kᵀ + bias) v for the deformable attention, the position bias in three passes);
- CrossFormer block (LayerNorm, SDA or LDA grouped attention with the dynamic position bias, MLP):
  the project's module (on CPU the explicit product, see ``bilevel.ops.lsda.biased_attention``), the
  same with PyTorch's fused ``scaled_dot_product_attention`` forced ("fused SDPA"), and the official
  explicit softmax(q kᵀ + bias) v.

Every method is checked to give the official output before it is timed. Forward and forward+backward are
timed round-robin with the other methods (as in ``bench_bra.py``: fastest round, speed-ups paired round
by round), then peak memory of forward+backward (growth of the resident high-water mark). Writes
``family_ops_<tag>.md`` and ``.json`` under ``benchmarks/results/``.

    python benchmarks/bench_family_ops.py            # a few minutes on 2 cores
    python benchmarks/bench_family_ops.py --quick --out /tmp/bench
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (benchmark_parser, fastest, paired_speedup, peak_memory_mib, run_metadata,  # noqa: E402
                     time_round_robin)

import bilevel  # noqa: E402
from bilevel.models.crossformer import CrossFormerBlock  # noqa: E402
from bilevel.ops import lsda  # noqa: E402
from bilevel.ops.dbra import DeBiLevelRoutingAttention, query_grid  # noqa: E402

#: (name, image size, batch); the map of stage s is image / 4 / 2**s
SETTINGS = [("224px", 224, 1), ("224px", 224, 8), ("512px", 512, 1)]
QUICK_SETTINGS = [("quick 112px", 112, 1)]


def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    """softmax(q kᵀ · scale + mask) v, as the official code writes it (the attention matrix is stored)."""
    attention = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None:
        attention = attention + attn_mask
    return torch.softmax(attention, dim=-1) @ value


def explicit_biased_attention(q, k, v, bias, scale, dropout_p=0.0):
    """CrossFormer's grouped attention as the official code writes it."""
    return explicit_attention(q, k, v, attn_mask=bias, scale=scale)


def fused_biased_attention(q, k, v, bias, scale, dropout_p=0.0):
    """CrossFormer's grouped attention through the fused kernel, whatever the device."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p)


def official_rpe_displacement(map_size, positions):
    """DBRA's bias displacement as the official code computes it: subtraction, halving and the (x, y) flip each
    a pass over the (N*g, HW, HgWg, 2) tensor (the project's gives the same numbers in one pass)."""
    grid = query_grid(*map_size, positions.dtype, positions.device).reshape(1, -1, 1, 2)
    return (0.5 * (grid - positions.reshape(positions.shape[0], 1, -1, 2))).flip(-1)


@contextlib.contextmanager
def project_numerics(module: nn.Module) -> Iterator[None]:
    """The module as the project runs it."""
    yield


@contextlib.contextmanager
def fused_sdpa(module: nn.Module) -> Iterator[None]:
    """CrossFormer's grouped attention forced through ``scaled_dot_product_attention``."""
    with mock.patch.object(lsda, "biased_attention", fused_biased_attention):
        yield


@contextlib.contextmanager
def official_numerics(module: nn.Module) -> Iterator[None]:
    """Run ``module`` the way the official code computes: explicit softmax attention, reference gather, DBRA's
    position bias in three passes."""
    previous = getattr(module, "backend", None)
    if previous is not None:
        module.backend = "reference"
    try:
        with mock.patch.object(F, "scaled_dot_product_attention", explicit_attention), \
                mock.patch.object(lsda, "biased_attention", explicit_biased_attention), \
                mock.patch.object(DeBiLevelRoutingAttention, "rpe_displacement",
                                  staticmethod(official_rpe_displacement)):
            yield
    finally:
        if previous is not None:
            module.backend = previous


def stage_modules(name: str, kind: type, operator: str) -> list[tuple[int, str, nn.Module]]:
    """(stage, label, module): the first module of type ``kind`` per stage and per ``extra_repr`` kind
    (SDA/LDA) of the model ``name``, in eval mode (no dropout)."""
    model = bilevel.create_model(name).eval()
    found = {}
    for qualified, module in model.named_modules():
        if isinstance(module, kind) and qualified.split(".")[0] in ("stages", "layers"):
            variant = module.extra_repr().split(",")[0] if isinstance(module, CrossFormerBlock) else ""
            label = f"{operator} {variant}".strip()
            found.setdefault((int(qualified.split(".")[1]), label), module)
    return [(stage, label, module) for (stage, label), module in sorted(found.items())]


def steps_of(module: nn.Module, numerics, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """The forward (no autograd) and forward+backward steps of ``module`` on ``x`` under ``numerics``."""
    leaf = x.detach().requires_grad_()

    def forward() -> None:
        with numerics(module), torch.no_grad():
            module(x)

    def train() -> None:
        with numerics(module):
            module(leaf).sum().backward()
        leaf.grad = None
        module.zero_grad(set_to_none=True)
    return forward, train


def compare(operator: str, stage: int, module: nn.Module, x: torch.Tensor, repeats: int, budget_s: float
            ) -> list[dict]:
    """One row per method (official first), each checked against the official output, then timed round-robin
    with the others (:func:`time_round_robin`); speed-ups are paired per round against the official."""
    methods = {"official": official_numerics, "project": project_numerics}
    if isinstance(module, CrossFormerBlock):
        methods["fused SDPA"] = fused_sdpa
    with torch.no_grad(), official_numerics(module):
        expected = module(x)
    steps = {}
    for method, numerics in methods.items():
        with numerics(module), torch.no_grad():
            torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=1e-4)
        steps[f"{method} forward"], steps[f"{method} train"] = steps_of(module, numerics, x)
    times = time_round_robin(steps, repeats, budget_s, progress=True)
    rows = []
    for method in methods:
        forward_runs, train_runs = times[f"{method} forward"], times[f"{method} train"]
        peak = peak_memory_mib(steps[f"{method} train"])
        rows.append({"operator": operator, "stage": stage + 1, "map": x.shape[1], "batch": x.shape[0],
                     "method": method, "forward_ms": 1e3 * fastest(forward_runs), "train_ms": 1e3 * fastest(train_runs),
                     "peak_mib": peak, "forward_runs": forward_runs, "train_runs": train_runs,
                     "forward_speedup": paired_speedup(times["official forward"], forward_runs),
                     "train_speedup": paired_speedup(times["official train"], train_runs)})
    official_peak = rows[0]["peak_mib"]
    for row in rows:
        row["memory_reduction"] = official_peak / row["peak_mib"] if official_peak and row["peak_mib"] else None
    return rows


def run(settings, repeats: int, budget_s: float) -> list[dict]:
    modules = (stage_modules("debiformer_tiny", DeBiLevelRoutingAttention, "DeBiFormer-T DBRA")
               + stage_modules("crossformer_small", CrossFormerBlock, "CrossFormer-S block"))
    rows = []
    for label, image, batch in settings:
        for stage, operator, module in modules:
            if stage >= (2 if image > 224 else 3):
                continue
            side = image // 4 // 2 ** stage
            channels = module.dim if isinstance(module, DeBiLevelRoutingAttention) else module.norm1.normalized_shape[0]
            x = torch.randn(batch, side, side, channels, generator=torch.Generator().manual_seed(stage))
            rows.extend({"setting": label, **row} for row in compare(operator, stage, module, x, repeats, budget_s))
            print(f"done: {label} batch {batch} {operator} stage {stage + 1}", flush=True)
    return rows


def _cell(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# DBRA and CrossFormer grouped attention benchmark ({meta['tag']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}",
             "- official: the same module with reference gather routing and explicit softmax attention",
             "- ×official: official / method, times paired round by round (median over rounds), or peak memory "
             "of forward+backward; ms: the fastest round", "",
             "| setting | batch | operator | stage (map) | method | fwd ms | fwd ×official | fwd+bwd ms | "
             "fwd+bwd ×official | peak MiB | mem ×official |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(" | ".join([
            f"| {row['setting']}", str(row["batch"]), row["operator"], f"{row['stage']} ({row['map']}²)",
            row["method"], _cell(row["forward_ms"], 2), _cell(row["forward_speedup"], 2), _cell(row["train_ms"], 2),
            _cell(row["train_speedup"], 2), _cell(row["peak_mib"]), _cell(row["memory_reduction"])]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> Path:
    parser = benchmark_parser(__doc__, "family_ops_<tag>.md/.json", 7, "timed rounds (after a warm-up round)")
    args = parser.parse_args(argv)
    settings, tag = (QUICK_SETTINGS, "quick") if args.quick else (SETTINGS, "cpu")
    torch.manual_seed(0)
    meta = {"tag": tag, **run_metadata("bench_family_ops.py", argv, torch.device("cpu"))}
    rows = run(settings, args.repeats, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"family_ops_{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(stem.with_suffix(".md").read_text())
    return stem


if __name__ == "__main__":
    main()
