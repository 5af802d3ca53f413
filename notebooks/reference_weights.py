"""Weights for the notebooks: the project's golden fill when the workspace has it, else seeded random ones.

The golden fill (``golden_fill.py``) gives every weight a deterministic value from its name; the golden
cases next to it hold what the *official* implementations output with those weights. Both live in the
project's workspace, outside the repository: ``<repository>/../shared/reference``, or wherever the
environment variable ``BILEVEL_REFERENCE`` points (the variable the tests read too). Without them the
notebooks still run, on the model's own seeded random initialisation, and skip the comparisons.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import nn

__all__ = ["REFERENCE_DIR", "load_golden_fill", "fill_reference_weights", "check_golden_case"]

#: the folder that holds golden_fill.py and golden/
REFERENCE_DIR = Path(os.environ.get("BILEVEL_REFERENCE",
                                    Path(__file__).resolve().parents[2] / "shared" / "reference"))


def load_golden_fill() -> Optional[ModuleType]:
    """The module ``golden_fill.py`` of :data:`REFERENCE_DIR` (fill_, make_input, decode_tensor), or None."""
    path = REFERENCE_DIR / "golden_fill.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("golden_fill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill_reference_weights(model: nn.Module) -> str:
    """Golden-fill ``model`` in place when the fill is available; returns "golden fill" or "random (seeded)"."""
    golden_fill = load_golden_fill()
    if golden_fill is None:
        return "random (seeded)"
    golden_fill.fill_(model)
    return "golden fill"


def check_golden_case(model: nn.Module, case_name: str) -> str:
    """Compare a golden-filled model with the official implementation's recorded logits.

    case_name: a file of ``golden/`` without ".json", e.g. "biformer_tiny-224-seed0". Checks that the
    model holds the golden fill (the case's weight checksum) and has the case's parameter count, runs
    the case's input (2, 3, 224, 224) and asserts that the logits equal the recorded ones within the
    case's tolerance. returns: what was checked, or why the check was skipped.
    """
    golden_fill, case_file = load_golden_fill(), REFERENCE_DIR / "golden" / f"{case_name}.json"
    if golden_fill is None or not case_file.is_file():
        return "golden case not available: skipped the comparison with the official code"
    case = json.loads(case_file.read_text())
    checksum = golden_fill.fill_checksum(model)
    if not all(math.isclose(checksum[key], value, rel_tol=1e-9) for key, value in case["fill"]["checksum"].items()):
        return "the model does not hold the golden fill: skipped the comparison with the official code"
    assert sum(p.numel() for p in model.parameters()) == case["param_count"]
    golden_input = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad():
        ours = model(golden_input)
    expected = golden_fill.decode_tensor(case["output"])
    tolerance = case["tolerance"]
    torch.testing.assert_close(ours, expected, atol=tolerance["atol"], rtol=tolerance["rtol"])
    difference = (ours - expected).abs().max().item()
    return (f"logits {tuple(ours.shape)} equal the official implementation's: max |difference| {difference:.1e} "
            f"(tolerance {tolerance['atol']:g} + {tolerance['rtol']:g}·|x|)")
