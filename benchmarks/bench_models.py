"""Whole-model throughput: images/s for evaluation and for a training step, every variant, one run.

Each bilevel variant is measured twice, with its default attention backend (``auto``) and with the
readable ``reference`` backend (the official gather), and beside timm's Swin-T and ConvNeXt-T built
in the same run (random weights; nothing is downloaded). CrossFormer has no routed attention, so it
has one row.

* evaluation: ``model(x)`` under ``torch.inference_mode()``
* training step: forward, cross-entropy on random labels, backward, SGD step

Models are measured round-robin (every model once per repeat, ``_common.time_round_robin``) so that a
change of machine load affects all rows alike: images/s from the fastest repeat, ×reference the median
over repeats of the ratio within a repeat. Writes ``models_<tag>.md`` and ``.json``.

    python benchmarks/bench_models.py                       # every variant, 224 px, batch 8
    python benchmarks/bench_models.py --models biformer_tiny --repeats 5
    python benchmarks/bench_models.py --quick --out /tmp    # smoke run
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F

import bilevel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, fastest, paired_speedup, run_metadata, time_round_robin  # noqa: E402

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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="variants (default: all registered)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--no-baselines", action="store_true", help="skip timm's Swin-T and ConvNeXt-T")
    parser.add_argument("--quick", action="store_true", help="smoke run: biformer_tiny, 64 px, batch 1, 1 round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.image_size, args.batch_size, args.repeats, args.no_baselines = \
            ["biformer_tiny"], 64, 1, 1, True
    names = args.models or default_models()

    models = {}  # label -> model; a variant's default build uses the "auto" backend
    for name in names:
        model = build(name, None)
        if takes_backend(model):
            models[f"{name} [auto]"] = model
            models[f"{name} [reference]"] = build(name, "reference")
        else:
            models[name] = model
    if not args.no_baselines:
        models.update({f"timm {name}": build(name, None) for name in BASELINES})

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0))
    steps = {}
    for label, model in models.items():
        steps[f"{label} eval"], steps[f"{label} train"] = eval_step(model, images), train_step(model, images)
    times = time_round_robin(steps, args.repeats, progress=True)

    rows = [{"model": label, "eval_images_per_s": args.batch_size / fastest(times[f"{label} eval"]),
             "train_images_per_s": args.batch_size / fastest(times[f"{label} train"])} for label in models]
    for row in rows:
        label = row["model"]
        if label.endswith("[auto]"):
            reference = label.replace("[auto]", "[reference]")
            row["eval_x_reference"] = paired_speedup(times[f"{reference} eval"], times[f"{label} eval"])
            row["train_x_reference"] = paired_speedup(times[f"{reference} train"], times[f"{label} train"])
    write(rows, args, argv)
    return rows


def write(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    tag = "quick" if args.quick else "cpu"
    meta = {**run_metadata("bench_models.py", argv), "image_size": args.image_size, "batch_size": args.batch_size,
            "repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"models_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Model throughput ({tag})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}",
             f"- {args.image_size} px, batch {args.batch_size}, fastest of {args.repeats} round-robin repeats "
             "(after a warm-up); ×reference: median over repeats of the ratio within a repeat",
             "- training step = forward + cross-entropy + backward + SGD step; random weights", "",
             "| model | eval img/s | train img/s | eval ×reference | train ×reference |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = lambda key: f"{row[key]:.2f}" if key in row else "–"
        lines.append(f"| {row['model']} | {row['eval_images_per_s']:.2f} | {row['train_images_per_s']:.2f} | "
                     f"{ratio('eval_x_reference')} | {ratio('train_x_reference')} |")
    (args.out / f"models_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
