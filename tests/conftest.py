"""Shared fixtures: the golden reference data in ../shared/reference and its weight-fill rule."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# torch.compile caches generated kernels on disk; parallel test workers must not share a cache folder
# (concurrent writers leave truncated kernels behind).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"bilevel-inductor-{os.getuid()}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))
REFERENCE = Path(os.environ.get("BILEVEL_REFERENCE", PROJECT_ROOT.parent / "shared" / "reference"))
GOLDEN = REFERENCE / "golden"


def _load_golden_fill():
    spec = importlib.util.spec_from_file_location("golden_fill", REFERENCE / "golden_fill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_cases(kind: str, prefix: str = "") -> list[Path]:
    """Paths of the public golden cases of one kind ("model" or "op"), optionally by name prefix."""
    manifest = json.loads((GOLDEN / "MANIFEST.json").read_text())
    return [GOLDEN / case["file"] for case in manifest["cases"]
            if case["kind"] == kind and case["case"].startswith(prefix)]


@pytest.fixture(scope="session")
def golden_fill():
    """The module ../shared/reference/golden_fill.py (fill_, make_input, decode_tensor)."""
    if not (REFERENCE / "golden_fill.py").is_file():
        pytest.fail(f"golden reference data not found at {REFERENCE} (expected ../shared/reference)")
    return _load_golden_fill()


def load_case(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def state_dict_layout(module: torch.nn.Module) -> list[list]:
    """[key, shape, dtype] of every state-dict entry, in the golden files' format."""
    return [[key, list(value.shape), str(value.dtype).replace("torch.", "")]
            for key, value in module.state_dict().items()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def assert_model_matches_golden_case(path: Path, golden_fill) -> None:
    """Build the case's model, check its state-dict layout and size, fill it, and compare its output.

    Also checks that the number of routing decisions recorded equals the official top-k calls.
    Optional entries (CrossFormer v1 buffers) may be present or not.
    """
    import bilevel
    from bilevel.ops import record_routing

    case = load_case(path)
    model = bilevel.create_model(case["model"], **case.get("create_kwargs", {}))
    layout = {str(entry) for entry in state_dict_layout(model)}
    required = {str(entry) for entry in case["state_dict"]}
    optional = {str(entry) for entry in case.get("optional_state_dict") or []}
    assert required <= layout, f"missing state-dict entries: {sorted(required - layout)[:5]}"
    assert layout <= required | optional, f"unexpected state-dict entries: {sorted(layout - required - optional)[:5]}"
    assert sum(p.numel() for p in model.parameters()) == case["param_count"]
    golden_fill.fill_(model)
    model.eval()
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad(), record_routing(model) as trace:
        out = model(x)
    expected = golden_fill.decode_tensor(case["output"])
    torch.testing.assert_close(out, expected, atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])
    assert sum(record.indices is not None for record in trace) == case["routing"]["topk_calls"]
