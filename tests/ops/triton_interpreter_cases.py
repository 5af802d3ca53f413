"""The ``triton`` backend under Triton's CPU interpreter, against the reference.

Run by ``test_backends.py::test_triton_kernels_match_reference_in_the_interpreter`` in a process that sets
``TRITON_INTERPRET=1`` before Triton is imported (not collected by the main suite: the name has no test_
prefix). The interpreter executes the kernels' tile arithmetic with NumPy, so the cases are small.
"""
from __future__ import annotations

import os

import pytest
import torch

from bilevel.ops.attention import routed_attention
from tests.ops.test_backends import BRA_CASES, ODD_CASES, _build_op, _compare_with_reference
from tests.conftest import load_case

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the module docstring)"

# (batch, query regions, key regions, query tokens, key tokens, heads, qk head dim, v head dim, topk):
# one full 64-token tile; 256-token regions in 4 x 4 tiles per region pair; BiFormer-T stage 2's regions;
# two tiles with a partial last one on both sides (100 queries, 70 keys) and head sizes of no power of two
TILED_CASES = {
    "one_tile": (1, 4, 4, 64, 64, 2, 32, 32, 1),
    "four_tiles": (1, 3, 3, 256, 256, 1, 16, 16, 1),
    "stage2_regions": (2, 9, 9, 16, 16, 4, 32, 32, 4),
    "partial_tiles": (1, 2, 3, 100, 70, 1, 48, 24, 2),
}


@pytest.mark.parametrize("shape", [*ODD_CASES.values(), *TILED_CASES.values()], ids=[*ODD_CASES, *TILED_CASES])
def test_outputs_and_gradients(shape):
    _compare_with_reference("triton", shape, weighted=False)


@pytest.mark.parametrize("layout", ["channel_slices", "channels_strided"])
def test_strided_inputs_are_read_in_place(layout):
    """q/k/v as channel slices of one projection (BRA) or with channel stride T (DBRA's NCHW regions)."""
    n, regions, tokens, heads, dim, topk = 2, 4, 9, 2, 8, 2
    generator = torch.Generator().manual_seed(5)
    if layout == "channel_slices":
        fused = torch.randn(n, regions, tokens, 3 * heads * dim, generator=generator, requires_grad=True)
        query, key, value = fused.split(heads * dim, dim=-1)
        leaves = [fused]
    else:
        maps = [torch.randn(n, regions, heads * dim, tokens, generator=generator, requires_grad=True)
                for _ in range(3)]
        query, key, value = (m.transpose(-1, -2) for m in maps)
        leaves = maps
    assert query.stride(-1) != 1 or not query.is_contiguous()
    indices = torch.rand(n, regions, regions, generator=generator).argsort(-1)[..., :topk]
    grad_out = torch.randn(n, regions, tokens, heads * dim, generator=generator)
    results = []
    for backend in ("reference", "triton"):
        out = routed_attention(query, key, value, indices, dim ** -0.5, heads, backend=backend)
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# every operator kind (BRA, nchwBRA, DBRA with Tq != Tk); the stage-3/4 cases take minutes in the interpreter
# (one program per tile of one or four tokens) and add no code path
INTERPRETED_GOLDEN = [path for path in BRA_CASES if not path.stem.startswith(("op_bra_legacy_t3", "op_dbra_t4"))]


@pytest.mark.parametrize("path", INTERPRETED_GOLDEN, ids=lambda p: p.stem)
def test_golden_op_cases(path, golden_fill):
    case = load_case(path)
    op = _build_op(case, "triton", golden_fill)
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad():
        out = op(x)
    expected = golden_fill.decode_tensor(case["output"])
    torch.testing.assert_close(out, expected, atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])

