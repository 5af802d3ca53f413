"""Do routed regions of a region on an object fall on that object? Measured on the built-in shapes.

For every validation picture of the built-in dataset (its pixel mask says where the object is) and
every routing layer of the served model, each query region mostly covered by an object (at least half
of its pixels) routes to its top-k key regions. The figure is the share of object pixels in the routed
regions (the query region itself left out), against chance: the share of object pixels in all other
regions, which is what routing to k regions picked at random would give on average.

    python benchmarks/routing_on_object.py                       # the app's embedded model
    python benchmarks/routing_on_object.py --checkpoint my.ckpt  # a bilevel fit checkpoint

Writes ``routing_on_object.md`` and ``.json`` to ``--out`` (default benchmarks/results) with the
command, date, torch version, thread count, machine and per-layer figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bilevel.data.images import list_images, read_image, read_mask
from bilevel.data.shapes import builtin_shapes
from bilevel.serving import Predictor, ServingError, fit_picture, load_served_model
from bilevel.viz.regions import region_boxes
from bilevel.viz.routing_view import routed_regions, routing_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, positive_int, run_metadata  # noqa: E402


def object_share(mask: np.ndarray, boxes) -> np.ndarray:
    """Fraction of object pixels (mask > 0) in each box: (R,)."""
    return np.array([mask[top:bottom, left:right].mean() if bottom > top and right > left else 0.0
                     for top, left, bottom, right in boxes], dtype=np.float64)


def measure(checkpoint=None, pictures: int = 48, on_object: float = 0.5) -> dict:
    """Per routing layer: queries counted, mean object share of routed regions and of all other regions."""
    served = load_served_model(None, checkpoint)
    predictor = Predictor(capacity=1)
    totals: dict[str, dict[str, float]] = {}
    val = builtin_shapes() / "segmentation" / "val"
    paths = list_images(val / "images")[:pictures]
    for path in paths:
        objects = (read_mask(val / "masks" / path.name) > 0).astype(np.float64)
        analysis = predictor.analyse(served, fit_picture(read_image(path)))
        for (stage, block), record in routing_layers(analysis.records).items():
            if record.kind == "lsda":
                continue
            boxes = region_boxes(objects.shape, record.map_size, record.region_grid, record.region_size)
            share = object_share(objects, boxes)
            entry = totals.setdefault(f"stage {stage} layer {block}", {"queries": 0, "routed": 0.0, "chance": 0.0,
                                                                       "topk": record.indices.shape[-1],
                                                                       "regions": len(boxes)})
            for query in np.flatnonzero(share >= on_object):
                others = [r for r in routed_regions(record, int(query)) if r != query]
                rest = np.delete(share, query)
                if not others:
                    continue
                entry["queries"] += 1
                entry["routed"] += float(share[others].mean())
                entry["chance"] += float(rest.mean())
    for entry in totals.values():
        queries = max(entry["queries"], 1)
        entry["routed"] /= queries
        entry["chance"] /= queries
        entry["ratio"] = entry["routed"] / entry["chance"] if entry["chance"] > 0 else float("nan")
    return {"model": served.key, "pictures": len(paths), "on_object_threshold": on_object, "layers": totals}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="bilevel fit checkpoint (default: the embedded model)")
    parser.add_argument("--pictures", type=positive_int, default=48, help="validation pictures to use (48: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    try:
        result = measure(options.checkpoint, options.pictures)
    except ServingError as error:
        if options.checkpoint is None:
            raise
        parser.error(f"--checkpoint {options.checkpoint}: {error}")
    result.update(run_metadata("routing_on_object.py", argv, torch.device("cpu")))   # the Predictor runs on the CPU
    lines = [f"# Routed regions on the object ({result['model']}, {result['pictures']} validation pictures)", "",
             f"`{result['command']}` on {result['date']}; torch {result['torch']}, {result['threads']} threads, "
             f"{result['machine']}", "",
             "| layer | regions | top-k | query regions on an object | object share of routed regions "
             "| chance (all other regions) | ratio |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["layers"].items():
        lines.append(f"| {name} | {entry['regions']} | {entry['topk']} | {entry['queries']} | {entry['routed']:.3f} "
                     f"| {entry['chance']:.3f} | {entry['ratio']:.2f} |")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "routing_on_object.md").write_text("\n".join(lines) + "\n")
    (options.out / "routing_on_object.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
