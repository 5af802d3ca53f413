"""Whole-model throughput: images/s for evaluation and for a training step, every variant, one run.

Each bilevel variant is measured twice, with its default attention backend (``auto``) and with the
readable ``reference`` backend (the official gather), and beside timm's Swin-T and ConvNeXt-T built
in the same run (random weights; nothing is downloaded). CrossFormer has no routed attention, so it
has one row.

* evaluation: ``model(x)`` under ``torch.inference_mode()``
* training step: forward, cross-entropy on random labels, backward, SGD step

Variants are measured one at a time, each in its own group with its reference build and the two
baselines: only that group is in memory, as in a user's process. (With all 20 models resident, their
weights and gradients, BiFormer-T's evaluation ratio read 1.30 and 1.35 in two runs, where its group
alone read 1.62: the reference's fresh gathered copies cost more or less with the allocator's state.) Within
a group the models run round-robin (each once per repeat, ``_common.time_round_robin``), so a change of
machine load touches them alike: images/s from the fastest repeat, ×reference and ×Swin-T the median
over repeats of the ratio within a repeat (baselines' images/s: fastest over all groups). A model that
fails (e.g. an input size it cannot take) gets a row with its error and the others are measured.
The process keeps freed memory in its heap first (``bilevel.runtime.retain_freed_memory``, as the ``bilevel``
CLI and the app do): with glibc's default thresholds every forward faults in fresh pages, the official gather's
copies most, at a rate that moves with the heap's state (``--default-allocator`` measures that way).
Writes ``models_<tag>.md`` and ``.json``.

    python benchmarks/bench_models.py                       # every variant, 224 px, batch 8
    python benchmarks/bench_models.py --models biformer_tiny --repeats 5
    python benchmarks/bench_models.py --quick --out /tmp    # smoke run
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F

import bilevel
from bilevel.runtime import retain_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, BenchmarkParser, fastest, paired_speedup, positive_int, run_metadata,  # noqa: E402
                     time_round_robin)

BASELINES = ("swin_tiny_patch4_window7_224", "convnext_tiny")


def default_models() -> list[str]:
    """Every registered variant under its bilevel name (the official DeBiFormer aliases are skipped)."""
    return [name for name in bilevel.list_models() if not name.startswith("debi_")]


def build(name: str, backend: str | None) -> torch.nn.Module:
    """A bilevel variant (with ``attn_backend`` when given) or a timm baseline, random weights."""
    if name in BASELINES:
        return timm.create_model(name, pretrained=False)
    kwargs = {"attn_backend": backend} if backend else {}
    return bilevel.create_model(name, **kwargs)


def takes_backend(model: torch.nn.Module) -> bool:
    """True when the model's constructor takes ``attn_backend`` (its attention routes)."""
    return "attn_backend" in inspect.signature(type(model).__init__).parameters


def eval_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def step():
        model.eval()
        with torch.inference_mode():
            model(images)
    return step


def train_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    labels = torch.randint(0, model.num_classes, (images.shape[0],), generator=torch.Generator().manual_seed(0))

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return step


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="biformer_tiny, 64 px, batch 1, 1 round, no baselines")
    parser.add_quick_option("--models", nargs="+", choices=bilevel.list_models(), metavar="MODEL",
                            default=default_models(), quick=["biformer_tiny"], help="variants to measure")
    parser.add_quick_option("--image-size", type=positive_int, default=224, quick=64, help="input side in pixels")
    parser.add_quick_option("--batch-size", type=positive_int, default=8, quick=1, help="images per batch")
    parser.add_quick_option("--repeats", type=positive_int, default=3, quick=1,
                            help="timed rounds after one warm-up round")
    parser.add_quick_option("--no-baselines", action="store_true", default=False, quick=True,
                            help="skip timm's Swin-T and ConvNeXt-T")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave malloc as it is (default: bilevel.runtime.retain_freed_memory(), as the CLI and "
                             "app do; the default allocator's page faults move evaluation ratios between runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def variant_models(name: str) -> dict[str, torch.nn.Module]:
    """label -> model for one variant: its default (``auto``) build and, when it routes, its reference build."""
    model = build(name, None)
    if not takes_backend(model):
        return {name: model}
    return {f"{name} [auto]": model, f"{name} [reference]": build(name, "reference")}


def measure(models: dict[str, torch.nn.Module], images: torch.Tensor, repeats: int,
            failures: dict[str, str]) -> dict[str, list[Optional[float]]]:
    """Seconds per eval and train step of every model, round-robin: ``{"<label> eval": [...], ...}``."""
    steps = {}
    for label, model in models.items():
        steps[f"{label} eval"], steps[f"{label} train"] = eval_step(model, images), train_step(model, images)
    return time_round_robin(steps, repeats, progress=True, failures=failures)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    args.allocator = "default (not changed)" if args.default_allocator else retain_freed_memory()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0))
    baselines = {} if args.no_baselines else {f"timm {name}": build(name, None) for name in BASELINES}
    swin = f"timm {BASELINES[0]}"
    baseline_times = {f"{label} {kind}": [] for label in baselines for kind in ("eval", "train")}
    failures: dict[str, str] = {}
    rows = []
    for name in args.models:
        models = variant_models(name)
        times = measure({**models, **baselines}, images, args.repeats, failures)
        for step in baseline_times:
            baseline_times[step] += times.get(step, [])

        def images_per_s(step: str) -> Optional[float]:
            return args.batch_size / fastest(times[step]) if step in times else None

        def speedup(reference: str, step: str) -> Optional[float]:
            return paired_speedup(times[reference], times[step]) if reference in times and step in times else None

        for label in models:
            row = {"model": label, "eval_images_per_s": images_per_s(f"{label} eval"),
                   "train_images_per_s": images_per_s(f"{label} train")}
            if label.endswith("[auto]"):
                reference = label.replace("[auto]", "[reference]")
                row["eval_x_reference"] = speedup(f"{reference} eval", f"{label} eval")
                row["train_x_reference"] = speedup(f"{reference} train", f"{label} train")
            if baselines:
                row["train_x_swin"] = speedup(f"{swin} train", f"{label} train")
            error = failures.get(f"{label} eval") or failures.get(f"{label} train")
            if error:
                row["error"] = error
            rows.append(row)
        del models, times
        gc.collect()
    for label in baselines:
        row = {"model": label, **{f"{kind}_images_per_s": args.batch_size / fastest(baseline_times[f"{label} {kind}"])
                                  for kind in ("eval", "train") if baseline_times[f"{label} {kind}"]}}
        error = failures.get(f"{label} eval") or failures.get(f"{label} train")
        if error:
            row["error"] = error
        rows.append(row)
    write(rows, args, argv)
    return rows


def _cell(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def write(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    tag = "quick" if args.quick else "cpu"
    meta = {**run_metadata("bench_models.py", argv, torch.device("cpu")), "image_size": args.image_size,
            "batch_size": args.batch_size, "repeats": args.repeats, "allocator": args.allocator}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"models_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Model throughput ({tag})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}",
             f"- {args.image_size} px, batch {args.batch_size}; each variant measured in its own group (its auto "
             "and reference builds and the baselines, nothing else in memory), round-robin within the group: "
             f"fastest of {args.repeats} repeats (after a warm-up); ×reference and ×Swin-T: median over repeats "
             "of the ratio within a repeat; baselines: fastest over all groups",
             "- training step = forward + cross-entropy + backward + SGD step; random weights",
             f"- allocator: {args.allocator}", "",
             "| model | eval img/s | train img/s | eval ×reference | train ×reference | train ×Swin-T | error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["model"], *(_cell(row.get(key)) for key in
                                 ("eval_images_per_s", "train_images_per_s", "eval_x_reference", "train_x_reference",
                                  "train_x_swin")),
                 row.get("error", "")]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / f"models_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
