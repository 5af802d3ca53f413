"""The fused_cpu backend's C++ kernel: built here, used by auto, exact on awkward inputs, and a clean fallback.

Its outputs and gradients on the golden op cases and the random odd cases are checked with every other
backend in test_backends.py; these tests cover what is particular to a compiled kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bilevel
from bilevel.ops import attention
from bilevel.ops.attention import reference_routed_attention, routed_attention, select_backend
from bilevel.ops.backends import fused_cpu
from tests.ops.test_backends import _random_inputs, _saved_bytes


def test_kernel_is_built_on_this_machine():
    """make setup builds it; without it auto would quietly fall back and the kernel would go untested."""
    assert fused_cpu.fused_cpu_available(), fused_cpu.fused_cpu_unavailable_reason()


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "region_weights"])
@pytest.mark.parametrize("key_tokens", [70, 12], ids=["read_in_place", "packed"])
def test_several_query_blocks_and_unequal_head_sizes(key_tokens, weighted):
    """150 queries per region: blocks of 64, 64 and 22 rows; value heads wider than q/k heads; key regions of 70
    tokens (read in place) or of 12 (packed once per query region and head, reused by its three blocks)."""
    query, key, value, indices, weights = _random_inputs(2, 3, 5, 150, key_tokens, 2, 8, 12, 2, weighted=weighted)
    tensors = [query, key, value] + ([weights] if weighted else [])
    outputs = [function(query, key, value, indices, 0.3, 2, region_weights=weights)
               for function in (reference_routed_attention, fused_cpu.fused_cpu_routed_attention)]
    grad_out = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(5))
    expected, actual = (torch.autograd.grad(out, tensors, grad_out) for out in outputs)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# The kernel multiplies in registers, without BLAS, for query regions of at most 9 tokens with key regions of fewer
# than 32, heads of at least 32 channels (multiples of 8) and no region weights. These cases sit on that path's edges.
REGISTER_PATH_CASES = {
    "biformer_t_stage3": (2, 49, 49, 4, 4, 8, 32, 32, 16),     # 64 routed keys, four rows in two pairs
    "odd_rows_padded_keys": (1, 9, 12, 9, 3, 2, 32, 40, 5),    # 9 rows (one alone), 15 keys (padded to 16), values
                                                               # of 40 channels (a pass of 32 and one of 8)
    "one_token_regions": (2, 30, 30, 1, 1, 2, 48, 64, 7),     # 1 row, 7 keys, values of 64 channels (two passes)
    "narrow_values": (1, 6, 8, 2, 5, 3, 32, 8, 3),             # values of 8 channels
}


@pytest.mark.parametrize("shape", REGISTER_PATH_CASES.values(), ids=REGISTER_PATH_CASES.keys())
def test_register_path_matches_the_reference(shape):
    """Inference on the register path, with query, key and value read through token strides wider than a row."""
    query, key, value, indices, _ = (t.detach() if isinstance(t, torch.Tensor) else t for t in _random_inputs(*shape))
    query, key, value = (torch.cat([t, torch.randn_like(t)], -1)[..., :t.shape[-1]] for t in (query, key, value))
    assert not query.is_contiguous()
    expected = reference_routed_attention(query, key, value, indices, 0.3, shape[5])
    with torch.no_grad():
        out = routed_attention(query, key, value, indices, 0.3, shape[5], backend="fused_cpu")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scores_far_below_the_row_maximum_underflow_as_in_the_reference():
    """Scores spread over hundreds: the kernel's own exp must give 0 below e^-87 and stay exact near the maximum.
    Small integer queries and keys make every score exact, so only the exponentials can differ."""
    generator = torch.Generator().manual_seed(11)
    query, key = (torch.randint(-3, 4, (2, 4, 20, 32), generator=generator).float().requires_grad_()
                  for _ in range(2))
    value = torch.randn(2, 4, 20, 16, generator=generator, requires_grad=True)
    indices = torch.rand(2, 4, 4, generator=generator).argsort(-1)[..., :2]
    outputs = [function(query, key, value, indices, 8.0, 2)
               for function in (reference_routed_attention, fused_cpu.fused_cpu_routed_attention)]
    scores = 8.0 * query.detach()[0, 0, :, :16] @ key.detach()[0, 0, :, :16].T
    assert (scores.amax(-1, keepdim=True) - scores).max() > 200, "the case must reach exp's underflow"
    grad_out = torch.randn(outputs[0].shape, generator=generator)
    expected, actual = (torch.autograd.grad(out, (query, key, value), grad_out) for out in outputs)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 4, 8, 8, 2, 8, 8, 2), (1, 4, 4, 4, 4, 2, 32, 32, 4)],
                         ids=["blas", "registers"])
@pytest.mark.parametrize("operand", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_spread_as_in_the_reference(operand, bad, shape):
    """The kernel is compiled with -ffast-math and has its own exp: NaN and inf must still reach the same outputs."""
    query, key, value, indices, _ = (t.detach() if isinstance(t, torch.Tensor) else t for t in _random_inputs(*shape))
    {"query": query, "key": key, "value": value}[operand][0, 0, 0, 0] = bad
    expected = reference_routed_attention(query, key, value, indices, 0.25, 2)
    out = routed_attention(query, key, value, indices, 0.25, 2, backend="fused_cpu")
    assert torch.equal(out.isnan(), expected.isnan())
    assert not torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_refused_by_name(dtype):
    query, key, value, indices, _ = _random_inputs(1, 4, 4, 8, 8, 2, 8, 8, 2)
    with pytest.raises(ValueError, match=r"fused_cpu: needs float32 CPU tensors; got torch\.(float64|bfloat16)"):
        routed_attention(query.to(dtype), key.to(dtype), value.to(dtype), indices, 0.25, 2, backend="fused_cpu")


def test_routing_index_out_of_range_is_an_error_not_a_read_outside():
    query, key, value, indices, _ = _random_inputs(1, 4, 4, 8, 8, 2, 8, 8, 2)
    indices = indices.clone()
    indices[0, 1, 0] = 4
    with torch.no_grad(), pytest.raises(RuntimeError, match="index 4 is outside the 4 key regions"):
        routed_attention(query, key, value, indices, 0.25, 2, backend="fused_cpu")


def test_training_saves_no_routed_copy():
    shape = (2, 16, 16, 16, 16, 2, 8, 8, 8)    # topk 8: a routed copy is 8x the size of k and v
    query, key, value, indices, _ = _random_inputs(*shape)
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in (query, key, value))
    saved = _saved_bytes(routed_attention, query, key, value, indices, 0.3, shape[5], backend="fused_cpu")
    assert 0 < saved <= 2 * inputs_bytes     # q, k, v, the output, the log-sum-exp and the indices


def test_auto_takes_the_kernel_for_cpu_inference_only(monkeypatch):
    stage1 = _random_inputs(1, 49, 49, 64, 64, 2, 8, 8, 1)        # 64 queries per region
    one_token = _random_inputs(1, 300, 300, 1, 1, 2, 8, 8, 16)    # 1-token regions, too many keys for dense_mask
    with torch.no_grad():
        assert select_backend(stage1[0], stage1[1], stage1[3]) == "fused_cpu"
        assert select_backend(one_token[0], one_token[1], one_token[3]) == "fused_cpu"
        assert select_backend(stage1[0].double(), stage1[1].double(), stage1[3]) == "matmul"
        assert select_backend(one_token[0].double(), one_token[1].double(), one_token[3]) == "sdpa"
        monkeypatch.setattr(attention, "fused_cpu_unavailable_reason", lambda: "no compiler")
        assert select_backend(stage1[0], stage1[1], stage1[3]) == "matmul"
    assert select_backend(stage1[0], stage1[1], stage1[3]) == "sdpa"           # training
    monkeypatch.setattr(attention, "fused_cpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(attention, "ROUTED_COPY_LIMIT_BYTES", 1)                 # a routed copy too large to keep
    assert select_backend(stage1[0], stage1[1], stage1[3]) == "fused_cpu"
    assert select_backend(one_token[0], one_token[1], one_token[3]) == "fused_cpu"


def test_auto_takes_the_kernel_over_dense_mask_up_to_two_fifths_routed():
    """Small maps: BiFormer-T's stage 3 at 224 px (49 regions of 4 tokens, 16 routed) takes the kernel in
    inference; routed more densely, or in training, it takes dense_mask."""
    stage3 = _random_inputs(1, 49, 49, 4, 4, 8, 32, 32, 16)
    dense = _random_inputs(1, 49, 49, 4, 4, 8, 32, 32, 20)
    with torch.no_grad():
        assert select_backend(stage3[0], stage3[1], stage3[3]) == "fused_cpu"
        assert select_backend(dense[0], dense[1], dense[3]) == "dense_mask"
    assert select_backend(stage3[0], stage3[1], stage3[3]) == "dense_mask"


def _bra_op_and_map():
    """A BRA op on a 32 x 32 map: 16 regions of 64 tokens, too many key tokens for dense_mask."""
    op = bilevel.create_op("BiLevelRoutingAttention", dim=32, num_heads=2, n_win=4, topk=2).eval()
    return op, torch.randn(1, 32, 32, 32)


def test_inference_under_torch_compile_keeps_the_kernel():
    """A fake (shape) implementation lets torch.compile keep the kernel as one operator of a full graph."""
    op, x = _bra_op_and_map()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    with torch.no_grad():
        expected = op(x)
        compiled = torch.compile(op, backend=recording_backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=1e-6)
    assert "bilevel.routed_attention_forward" in graphs[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_traces_exports_and_flop_counters_see_standard_operators():
    """auto leaves the kernel to eager and compiled runs: the ONNX exporter's trace, torch.export and
    FlopCounterMode get operators they know."""
    from torch.utils.flop_counter import FlopCounterMode

    op, x = _bra_op_and_map()
    with torch.no_grad():
        regions, routing = torch.zeros(1, 16, 64, 32), torch.zeros(1, 16, 2, dtype=torch.long)
        assert select_backend(regions, regions, routing) == "fused_cpu"
        traced = str(torch.jit.trace(op, x).inlined_graph)
        exported = str(torch.export.export(op, (x,)).graph)
        counted = {}
        for backend in ("auto", "matmul"):               # matmul: what auto takes here without the kernel
            op.backend = backend
            with FlopCounterMode(display=False) as counter:
                op(x)
            counted[backend] = counter.get_total_flops()
    assert "routed_attention_forward" not in traced and "routed_attention_forward" not in exported
    assert "aten::baddbmm" in traced and "aten.baddbmm" in exported    # matmul's products, in place of the kernel
    assert counted["auto"] == counted["matmul"] > 0


FALLBACK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from bilevel.ops.attention import routed_attention, select_backend
    from bilevel.ops.backends import fused_cpu
    {setup}
    query, key, value = (torch.randn(1, 16, 64, 16) for _ in range(3))     # 16 regions of 64 tokens
    indices = torch.stack([torch.arange(16), torch.arange(16).roll(1)], dim=-1)[None]   # (1, 16, 2)
    with torch.no_grad():
        print("auto:", select_backend(query, key, indices))
        expected = routed_attention(query, key, value, indices, 0.25, 2, backend="reference")
        torch.testing.assert_close(routed_attention(query, key, value, indices, 0.25, 2), expected)
        try:
            routed_attention(query, key, value, indices, 0.25, 2, backend="fused_cpu")
        except ValueError as error:
            print("error:", error)
""")


def _run_fallback(setup: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.format(setup=setup)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_concurrent_first_calls_load_the_kernel_once():
    """An app's first requests may arrive together: every thread gets the kernel, none an error."""
    script = textwrap.dedent("""
        import threading
        from bilevel.ops.backends import fused_cpu
        results = []
        threads = [threading.Thread(target=lambda: results.append(fused_cpu.fused_cpu_available())) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("available:", results)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "available: [True, True, True, True]" in result.stdout, result.stderr


def test_switched_off_by_the_environment():
    output = _run_fallback("", {**os.environ, "BILEVEL_CPU_KERNEL": "0"})
    assert "auto: matmul" in output
    assert "error: fused_cpu: the C++ kernel is unavailable: turned off by BILEVEL_CPU_KERNEL=0" in output


def test_a_failed_build_falls_back_with_the_reason(tmp_path):
    """A source that does not compile (as on a machine without a working compiler): auto keeps to the other
    backends, one warning says why, and asking for fused_cpu by name is a ValueError with the reason."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    setup = f"fused_cpu.SOURCE = __import__('pathlib').Path({str(broken)!r})"
    output = _run_fallback(setup, {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "build")})
    assert "auto: matmul" in output
    assert "the fused_cpu attention kernel is unavailable, its build failed" in output
    assert "error: fused_cpu: the C++ kernel is unavailable: its build failed" in output
    assert "broken.cpp:1" in output                     # the compiler's own first error, not ninja's last line
