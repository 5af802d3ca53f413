"""Training throughput: images/s of a Lightning fit step, per backbone family, classification and segmentation.

Each run builds the task (``ImageClassifier``, or ``SemanticSegmenter`` with a Semantic FPN head) for the
tiny variant of each registered family and fits it with a Lightning ``Trainer`` on the built-in shapes
resized to ``--image-size``. A callback times every training batch from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, loss, backward, AdamW step; data loading excluded); the first
``--warmup`` steps are dropped and the median of the rest gives images/s = batch / step time.

Writes ``train_<tag>.md`` and ``train_<tag>.json`` (tag: cpu, gpu or quick) with the command, date, torch
and Lightning versions, device and thread count.

    python benchmarks/bench_train.py                      # CPU: 224 px, batch 8
    python benchmarks/bench_train.py --precision bf16-mixed --batch-size 64   # on a GPU
    python benchmarks/bench_train.py --quick --out /tmp/bench                 # smoke run
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning
import torch
from lightning import Callback, Trainer

from bilevel.data import ShapesClassificationDataModule, ShapesSegmentationDataModule
from bilevel.models import MODEL_NAMES
from bilevel.tasks import ImageClassifier, SemanticSegmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, BenchmarkParser, int_at_least, positive_int, run_metadata  # noqa: E402

FAMILIES = ("biformer", "debiformer", "crossformer")
TASKS = ("classification", "segmentation")


class StepTimer(Callback):
    """Wall time of each training batch (synchronising the GPU when there is one)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._start)


def measure(task: str, model_name: str, args, cache: Path, device: torch.device) -> dict:
    """Fit ``warmup + steps`` batches on ``device``; returns the row of the results table."""
    if task == "classification":
        data = ShapesClassificationDataModule(root=str(cache), model_name=model_name, image_size=args.image_size,
                                              batch_size=args.batch_size, num_workers=args.workers)
        module = ImageClassifier(model_name, num_classes=data.num_classes, drop_path_rate=0.1)
    else:
        data = ShapesSegmentationDataModule(root=str(cache), model_name=model_name, image_size=args.image_size,
                                            batch_size=args.batch_size, num_workers=args.workers)
        module = SemanticSegmenter(model_name, num_classes=data.num_classes, head="fpn", drop_path_rate=0.1)
    timer = StepTimer()
    trainer = Trainer(accelerator=device.type, devices=1, precision=args.precision,
                      max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer], default_root_dir=str(cache))
    trainer.fit(module, datamodule=data)
    step = statistics.median(timer.times[args.warmup:])
    return {"task": task, "model": model_name, "image_size": args.image_size, "batch": args.batch_size,
            "precision": args.precision, "step_s": round(step, 4), "images_per_s": round(args.batch_size / step, 2),
            "steps_timed": len(timer.times) - args.warmup, "device": str(trainer.strategy.root_device)}


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.splitlines()[0],
                             quick_help="64 px, batch 2, one timed step, no loader workers")
    parser.add_quick_option("--image-size", type=positive_int, default=224, quick=64, help="input side in pixels")
    parser.add_quick_option("--batch-size", type=positive_int, default=8, quick=2, help="images per batch")
    parser.add_quick_option("--steps", type=positive_int, default=3, quick=1, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed steps first (default 1)")
    parser.add_argument("--precision", default="32-true")
    parser.add_quick_option("--workers", type=int_at_least(0), default=2, quick=0, help="data loader workers")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to fit (default both)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [f"{family}_tiny" for family in FAMILIES if f"{family}_tiny" in MODEL_NAMES]
    with tempfile.TemporaryDirectory() as cache:
        rows = [measure(task, name, args, Path(cache), device) for task in args.tasks for name in models]
    tag = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    meta = {**run_metadata("bench_train.py", argv, device), "lightning": lightning.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "not_measured": [f"{f}_tiny" for f in FAMILIES if f"{f}_tiny" not in MODEL_NAMES]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"train_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Training throughput ({tag})", "", f"Command: `{meta['command']}`  ",
             f"Date: {meta['date']}; torch {meta['torch']}, Lightning {meta['lightning']}; "
             f"{meta['threads']} threads on {meta['machine']}; load average {meta['load_average_1min']} at the end "
             "(other work on the machine slows these figures)", "",
             "A fit step = forward, loss, backward and AdamW step (data loading excluded); median over timed steps.",
             "", "| task | model | image | batch | precision | step (s) | images/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['model']} | {r['image_size']} | {r['batch']} | {r['precision']} | "
              f"{r['step_s']} | {r['images_per_s']} |" for r in rows]
    if meta["not_measured"]:
        lines += ["", f"Not registered when this ran: {', '.join(meta['not_measured'])}."]
    (args.out / f"train_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
