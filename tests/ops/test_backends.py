"""Every attention backend computes the reference function: outputs and gradients.

Ground truth: the golden op cases of the official code (output) and the reference backend
(gradients, soft routing, odd shapes the golden set does not cover).
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

import bilevel
from bilevel.ops import backends
from bilevel.ops import attention
from bilevel.ops.attention import ATTENTION_BACKENDS, reference_routed_attention, routed_attention, select_backend
from bilevel.ops.backends import recompute
from bilevel.ops.backends import _select
from bilevel.ops.backends._select import select_regions
from bilevel.ops.backends.flex import routed_block_mask
from tests.conftest import golden_cases, load_case

BRA_CASES = golden_cases("op", "op_bra") + golden_cases("op", "op_dbra")   # DBRA: same core, Tq != Tk
# triton runs on CUDA, on CPU only under Triton's interpreter: triton_interpreter_cases.py, run by a test below
FAST_BACKENDS = sorted(set(ATTENTION_BACKENDS) - {"reference", "triton"})
TRAINABLE = [name for name in FAST_BACKENDS if name != "flex"]       # flex: no CPU backward in torch
WEIGHTED = ["sdpa", "matmul", "recompute", "fused_cpu"]                       # backends supporting region_weights


def _build_op(case: dict, backend: str, fill) -> torch.nn.Module:
    op = bilevel.create_op(case["op"]["class"], **case["op"]["kwargs"], backend=backend)
    fill.fill_(op)
    return op.eval()


def test_registry_has_the_documented_backends():
    assert set(ATTENTION_BACKENDS) == {"reference", *backends.BACKENDS}
    assert set(backends.BACKENDS) == {"sdpa", "matmul", "recompute", "dense_mask", "fused_cpu", "flex", "triton"}


@pytest.mark.parametrize("backend", [*FAST_BACKENDS, "auto"])
@pytest.mark.parametrize("path", BRA_CASES, ids=lambda p: p.stem)
def test_golden_op_output(path, backend, golden_fill):
    case = load_case(path)
    op = _build_op(case, backend, golden_fill)
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad():
        out = op(x)
    expected = golden_fill.decode_tensor(case["output"])
    torch.testing.assert_close(out, expected, atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])


@pytest.mark.parametrize("backend", [*TRAINABLE, "auto"])
@pytest.mark.parametrize("path", BRA_CASES, ids=lambda p: p.stem)
def test_golden_op_gradients_match_reference(path, backend, golden_fill):
    case = load_case(path)
    grads = {}
    for name in ("reference", backend):
        op = _build_op(case, name, golden_fill)
        x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"]).requires_grad_()
        out = op(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads[name] = {"input": x.grad, **{key: p.grad for key, p in op.named_parameters()}}
    for key, expected in grads["reference"].items():
        # weight gradients sum over every token in another order: float32 rounding grows with their scale
        atol = 1e-5 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(grads[backend][key], expected, atol=atol, rtol=1e-4, msg=key)


# (batch, query regions, key regions, query tokens, key tokens, heads, qk head dim, v head dim, topk)
ODD_CASES = {
    "tq_ne_tk": (2, 6, 6, 5, 3, 2, 4, 4, 2),
    "non_square_grid": (3, 6, 10, 4, 4, 1, 8, 8, 3),
    "topk1_batch1": (1, 9, 9, 7, 7, 3, 2, 5, 1),
    "topk_all_batch3": (3, 4, 4, 3, 9, 2, 6, 3, 4),
}


def _random_inputs(batch, num_queries, num_keys, query_tokens, key_tokens, heads, qk_dim, v_dim, topk,
                   weighted=False, device=torch.device("cpu")):
    """Seeded query, key, value (leaves requiring grad), distinct routing indices and optional region weights."""
    generator = torch.Generator().manual_seed(7)

    def leaf(values):
        return values.to(device).requires_grad_()

    query = leaf(torch.randn(batch, num_queries, query_tokens, heads * qk_dim, generator=generator))
    key = leaf(torch.randn(batch, num_keys, key_tokens, heads * qk_dim, generator=generator))
    value = leaf(torch.randn(batch, num_keys, key_tokens, heads * v_dim, generator=generator))
    indices = torch.rand(batch, num_queries, num_keys, generator=generator).argsort(-1)[..., :topk].to(device)
    weights = leaf(torch.rand(batch, num_queries, topk, generator=generator)) if weighted else None
    return query, key, value, indices, weights


def _compare_with_reference(backend, shape, weighted, device=torch.device("cpu")):
    """Outputs and gradients of ``backend`` against the reference on random inputs of ``shape``, on ``device``.

    On CPU both agree to 1e-5. On a GPU the kernels sum in other orders, so each result must be as close to a
    float64 reference as the fp32 reference is, within a factor of 4 (plus 1e-6): a sum over thousands of
    terms, such as the region_weights gradient, drifts by more than 1e-5 in both.
    """
    query, key, value, indices, weights = _random_inputs(*shape, weighted=weighted, device=device)
    heads, scale = shape[5], shape[6] ** -0.5
    inputs = [query, key, value] + ([weights] if weighted else [])
    names = ["output", "query", "key", "value", "region_weights"]

    def results(function, tensors, grad_out=None):   # [output, *gradients]; grad_out None: a seeded random one
        out = function(*tensors[:3], indices, scale, heads, region_weights=tensors[3] if weighted else None)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
        return [out, *torch.autograd.grad(out, tensors, grad_out.to(out.dtype))], grad_out

    expected, grad_out = results(reference_routed_attention, inputs)
    actual, _ = results(functools.partial(routed_attention, backend=backend), inputs, grad_out)
    if device.type == "cpu":
        for name, got, want in zip(names, actual, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda text, name=name: f"{name}: {text}")
        return
    exact, _ = results(reference_routed_attention, [t.detach().double().requires_grad_() for t in inputs], grad_out)
    for name, got, want, anchor in zip(names, actual, expected, exact):
        bound = 4 * (want.double() - anchor).abs().max().item() + 1e-6
        error = (got.double() - anchor).abs().max().item()
        assert error <= bound, (f"{name}: {backend} is {error:.2e} from float64, "
                                f"the fp32 reference {(bound - 1e-6) / 4:.2e}")


@pytest.mark.parametrize("backend", [*TRAINABLE, "auto"])
@pytest.mark.parametrize("shape", ODD_CASES.values(), ids=ODD_CASES.keys())
def test_random_odd_cases(backend, shape):
    _compare_with_reference(backend, shape, weighted=False)


@pytest.mark.parametrize("backend", [*WEIGHTED, "auto"])
@pytest.mark.parametrize("shape", ODD_CASES.values(), ids=ODD_CASES.keys())
def test_random_odd_cases_with_region_weights(backend, shape):
    _compare_with_reference(backend, shape, weighted=True)


@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "region_weights"])
@pytest.mark.parametrize("shape", ODD_CASES.values(), ids=ODD_CASES.keys())
def test_inference_in_chunks_of_query_regions(shape, weighted, backend, monkeypatch):
    """Without autograd sdpa and matmul attend chunk by chunk: here 2 query regions per chunk, the last shorter;
    every chunk's routed keys (values) are copied into one buffer allocated per call."""
    query, key, value, indices, weights = _random_inputs(*shape, weighted=weighted)
    heads, scale, topk = shape[5], shape[6] ** -0.5, shape[8]
    routed_tokens = topk * key.shape[2]
    per_region = routed_tokens * (key.shape[-1] + value.shape[-1] + (query.shape[2] if backend == "matmul" else 0))
    module = getattr(backends, backend)
    monkeypatch.setattr(module, "CHUNK_BYTES", 2 * per_region * key.element_size())
    selections = []
    buffers = []

    def recording(*args, **kwargs):
        selections.append(args)
        buffers.append(kwargs["out"])
        return select_regions(*args, **kwargs)

    monkeypatch.setattr(_select, "select_regions", recording)
    with torch.no_grad():
        expected = reference_routed_attention(query, key, value, indices, scale, heads, region_weights=weights)
        out = routed_attention(query, key, value, indices, scale, heads, region_weights=weights, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert len(selections) == 2 * -(-shape[0] * shape[1] // 2)      # keys and values, chunk by chunk
    assert len({buffer.data_ptr() for buffer in buffers}) == 2 and len(buffers) == len(selections)


@pytest.mark.parametrize("limit, calls", [(None, 2), (2, 18)], ids=["one_call", "memory_bound_chunks"])
def test_sdpa_off_cpu_chunks_only_for_memory(monkeypatch, limit, calls):
    """Off CPU (meta tensors stand in for a GPU) the CPU's cache-sized chunks are off; DEVICE_CHUNK_BYTES
    (here room for ``limit`` query regions) still bounds the routed copy."""
    shape = ODD_CASES["non_square_grid"]
    query, key, value, indices, _ = (t if t is None else t.detach().to("meta") for t in _random_inputs(*shape))
    per_region = shape[8] * key.shape[2] * (key.shape[-1] + value.shape[-1]) * key.element_size()
    monkeypatch.setattr(backends.sdpa, "CHUNK_BYTES", per_region)          # one region per chunk on CPU
    if limit is not None:
        monkeypatch.setattr(backends.sdpa, "DEVICE_CHUNK_BYTES", limit * per_region)
    selections = []
    monkeypatch.setattr(_select, "select_regions",
                        lambda *args, **kwargs: selections.append(args) or select_regions(*args, **kwargs))
    out = routed_attention(query, key, value, indices, 0.3, shape[5], backend="sdpa")
    assert out.shape == (*shape[:2], shape[3], shape[5] * shape[7]) and out.device.type == "meta"
    assert len(selections) == calls                    # keys and values per chunk: 18 query regions in 1 or 9


def test_matmul_inference_compiles_to_one_graph():
    """The chunk loop with its reused buffers traces into one graph."""
    op = bilevel.create_op("BiLevelRoutingAttention", dim=16, num_heads=2, n_win=3, topk=1, backend="matmul").eval()
    x = torch.randn(1, 24, 24, 16)                     # 9 regions of 64 tokens
    with torch.no_grad():
        expected = op(x)
        compiled = torch.compile(op, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [*TRAINABLE, "auto"])
def test_non_contiguous_inputs(backend):
    query, key, value, indices, _ = _random_inputs(*ODD_CASES["non_square_grid"])
    query_t = query.detach().transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_()   # channel stride Tq
    heads, scale = 1, 0.3
    expected = reference_routed_attention(query, key, value, indices, scale, heads)
    out = routed_attention(query_t, key, value, indices, scale, heads, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(out.shape[:-1] + (1,)).expand(out.shape)                              # non-contiguous
    for grad, expected_grad in zip(torch.autograd.grad(out, [query_t, key, value], grad_out),
                                   torch.autograd.grad(expected, [query, key, value], grad_out)):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_sdpa_gives_the_fused_kernel_channel_contiguous_queries(grad):
    """A channels-first query map (DBRA's) must not push SDPA onto its slow math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value, indices, _ = _random_inputs(1, 9, 9, 4, 16, 2, 16, 16, 2)
    query_t = query.detach().transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_(grad)
    expected = reference_routed_attention(query, key, value, indices, 0.25, 2)
    with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # no math fallback allowed
        out = routed_attention(query_t, key, value, indices, 0.25, 2, backend="sdpa")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", ODD_CASES.values(), ids=ODD_CASES.keys())
def test_flex_forward_on_cpu(shape):
    query, key, value, indices, _ = _random_inputs(*shape)
    heads, scale = shape[5], shape[6] ** -0.5
    with torch.no_grad():
        expected = reference_routed_attention(query, key, value, indices, scale, heads)
        out = routed_attention(query, key, value, indices, scale, heads, backend="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# regions of 64 tokens: FlexAttention's block mask has one block per region (flex.REGION_BLOCK_MULTIPLE)
REGION_BLOCK_CASE = (2, 4, 6, 64, 128, 2, 16, 8, 2)


def test_flex_forward_on_cpu_with_region_blocks():
    query, key, value, indices, _ = _random_inputs(*REGION_BLOCK_CASE)
    with torch.no_grad():
        expected = reference_routed_attention(query, key, value, indices, 0.25, 2)
        out = routed_attention(query, key, value, indices, 0.25, 2, backend="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _listed_blocks(counts: Tensor, lists: Tensor, columns: int) -> Tensor:
    """(N, 1, rows) counts and (N, 1, rows, >=count) block lists -> (N, rows, columns) bool."""
    dense = torch.zeros(*counts.shape[::2], columns, dtype=torch.bool)
    for batch, row in itertools.product(*map(range, dense.shape[:2])):
        dense[batch, row, lists[batch, 0, row, :counts[batch, 0, row]].long()] = True
    return dense


def test_region_block_mask_lists_exactly_the_routed_regions():
    n, num_queries, num_keys, query_tokens, key_tokens, *_, topk = REGION_BLOCK_CASE
    indices = _random_inputs(*REGION_BLOCK_CASE)[3]
    allowed = torch.zeros(n, num_queries, num_keys, dtype=torch.bool).scatter_(-1, indices, True)
    mask = routed_block_mask(indices, num_keys, query_tokens, key_tokens, compile_mask=False)
    assert mask.BLOCK_SIZE == (query_tokens, key_tokens)
    assert not mask.kv_num_blocks.any()                      # no partial blocks: no mask is evaluated
    assert torch.equal(_listed_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, num_keys), allowed)
    # the transposed lists that the backward pass walks
    assert torch.equal(_listed_blocks(mask.full_q_num_blocks, mask.full_q_indices, num_queries),
                       allowed.transpose(1, 2))
    # the tensors torch's own constructor makes from the same lists (values, dtype, shape and layout: the
    # kernels read them as contiguous int32, and a strided transposed list gave wrong gradients on a GPU)
    expected = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.full_kv_indices, mask.full_kv_num_blocks,
                                        mask.full_kv_indices, BLOCK_SIZE=(query_tokens, key_tokens))
    for name in ("kv_num_blocks", "q_num_blocks", "full_kv_num_blocks", "full_kv_indices", "full_q_num_blocks",
                 "full_q_indices", "kv_indices", "q_indices"):
        ours, theirs = getattr(mask, name), getattr(expected, name)
        assert ours.dtype == theirs.dtype == torch.int32 and ours.shape == theirs.shape, name
        assert ours.is_contiguous(), name
        if name not in ("kv_indices", "q_indices"):       # lists of empty rows: never read
            assert torch.equal(ours, theirs), name


def test_token_block_mask_covers_every_routed_pair():
    n, num_queries, num_keys, tokens, topk = 1, 36, 36, 16, 4     # 16-token regions: 128-token mask blocks
    indices = torch.rand(n, num_queries, num_keys, generator=torch.Generator().manual_seed(1)).topk(topk).indices
    mask = routed_block_mask(indices, num_keys, tokens, tokens, compile_mask=False)
    assert mask.BLOCK_SIZE == (128, 128)
    allowed = torch.zeros(n, num_queries, num_keys, dtype=torch.bool).scatter_(-1, indices, True)
    token_mask = allowed.repeat_interleave(tokens, 1).repeat_interleave(tokens, 2)          # (N, L, S)
    blocks = F.max_pool2d(token_mask[:, None].float(), 128, ceil_mode=True)[:, 0].bool()   # any routed pair
    assert torch.equal(mask.to_dense()[:, 0].bool(), blocks)


@pytest.mark.parametrize("chunk_elements", [1, recompute.CHUNK_ELEMENTS], ids=["one_region_per_chunk", "default"])
@pytest.mark.parametrize("kernel", sorted(recompute.KERNELS))
@pytest.mark.parametrize("weighted", [False, True])
def test_recompute_kernels_and_chunks(monkeypatch, kernel, chunk_elements, weighted):
    monkeypatch.setattr(recompute, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(recompute, "kernel_name", lambda query, value: kernel)
    _compare_with_reference("recompute", ODD_CASES["non_square_grid"], weighted)   # equal q/k and v head sizes


def _saved_bytes(function, *args, **kwargs) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``function``."""
    saved = {}

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args, **kwargs)
    return sum(saved.values())


def test_recompute_saves_no_routed_copy():
    shape = (2, 16, 16, 16, 16, 2, 8, 8, 8)    # topk 8: a routed copy is 8x the size of k and v
    query, key, value, indices, _ = _random_inputs(*shape)
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in (query, key, value))
    routed_copy_bytes = 2 * shape[-1] * key.untyped_storage().nbytes() * shape[1] // shape[2]
    reference = _saved_bytes(reference_routed_attention, query, key, value, indices, 0.3, shape[5])
    light = _saved_bytes(routed_attention, query, key, value, indices, 0.3, shape[5], backend="recompute")
    assert reference > routed_copy_bytes
    # q, k, v, the output (the size of q here), log-sum-exp and the int64 indices
    assert light <= 2 * inputs_bytes


@pytest.mark.parametrize("backend", ["dense_mask", "flex", "triton"])
def test_backends_without_soft_routing_refuse_region_weights(backend):
    query, key, value, indices, weights = _random_inputs(*ODD_CASES["tq_ne_tk"], weighted=True)
    with torch.no_grad(), pytest.raises(ValueError, match="region_weights"):
        routed_attention(query, key, value, indices, 0.5, 2, region_weights=weights, backend=backend)


def test_flex_refuses_repeated_indices():
    query, key, value, indices, _ = _random_inputs(*ODD_CASES["tq_ne_tk"])
    indices[0, 0, 1] = indices[0, 0, 0]
    with torch.no_grad(), pytest.raises(ValueError, match="distinct"):
        routed_attention(query, key, value, indices, 0.5, 2, backend="flex")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", [*TRAINABLE, "auto"])
def test_repeated_indices_count_twice_as_in_the_reference(backend, compiled):
    """A key region listed twice is gathered, so weighted, twice by the reference; every trainable backend and
    auto (which takes dense_mask for this small map) give that function, eagerly and compiled."""
    shape = ODD_CASES["non_square_grid"]                              # topk 3: one region twice, one once
    query, key, value, indices, _ = _random_inputs(*shape)
    indices = indices.clone()
    indices[:, :, -1] = indices[:, :, 0]                               # every query region repeats a region
    heads, scale = shape[5], 0.5
    assert backend != "auto" or select_backend(query, key, indices) == "dense_mask"
    attend = functools.partial(routed_attention, backend=backend)
    if compiled:
        attend = torch.compile(attend, backend="aot_eager", fullgraph=True)
    expected = reference_routed_attention(query, key, value, indices, scale, heads)
    out = attend(query, key, value, indices, scale, heads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_triton_kernels_match_reference_in_the_interpreter():
    """The Triton kernels, run by Triton's CPU interpreter in a fresh process (the variable must be set before
    Triton is imported): outputs and gradients of odd cases, strided inputs and the golden op cases."""
    cases = Path(__file__).with_name("triton_interpreter_cases.py")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_triton_refuses_float64():
    query, key, value, indices, _ = (t if t is None else t.detach().double() if t.is_floating_point() else t
                                     for t in _random_inputs(*ODD_CASES["tq_ne_tk"]))
    with pytest.raises(ValueError, match="triton: float64"):
        routed_attention(query, key, value, indices, 0.5, 2, backend="triton")


def test_triton_refuses_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    query, key, value, indices, _ = _random_inputs(*ODD_CASES["tq_ne_tk"])
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        routed_attention(query, key, value, indices, 0.5, 2, backend="triton")


def test_flex_refuses_backward_on_cpu():
    query, key, value, indices, _ = _random_inputs(*ODD_CASES["tq_ne_tk"])
    with pytest.raises(ValueError, match="backward on CPU"):
        routed_attention(query, key, value, indices, 0.5, 2, backend="flex")


def test_shape_errors_name_the_argument():
    query, key, value, indices, _ = _random_inputs(*ODD_CASES["tq_ne_tk"])
    with pytest.raises(ValueError, match="indices"):
        routed_attention(query, key, value, indices[:, :3], 0.5, 2, backend="sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        routed_attention(query, key, value, indices, 0.5, 2, backend="fused")


def test_auto_rule(monkeypatch):
    """Without the fused_cpu kernel (its part of the rule: test_fused_cpu.py)."""
    monkeypatch.setattr(attention, "fused_cpu_unavailable_reason", lambda: "not built")
    small = _random_inputs(1, 4, 4, 16, 16, 2, 8, 8, 2)          # 64 key tokens, half the regions routed
    large = _random_inputs(1, 49, 49, 64, 64, 2, 8, 8, 4)        # 3136 key tokens
    query, key, _, indices, weights = _random_inputs(1, 49, 49, 64, 64, 2, 8, 8, 4, weighted=True)
    assert select_backend(small[0], small[1], small[3]) == "dense_mask"
    assert select_backend(small[0], small[1], small[3], region_weights=weights[:, :4, :2]) == "sdpa"
    assert select_backend(large[0], large[1], large[3]) == "sdpa"
    assert select_backend(query, key, indices, weights) == "sdpa"
    routed_copy = 49 * 4 * 64 * 32 * 4                             # indices x key tokens x (k + v channels) x fp32
    monkeypatch.setattr(attention, "ROUTED_COPY_LIMIT_BYTES", routed_copy - 1)
    assert select_backend(large[0], large[1], large[3]) == "recompute"
    assert select_backend(query, key, indices, weights) == "recompute"
    with torch.no_grad():
        assert select_backend(large[0], large[1], large[3]) == "sdpa"
    assert select_backend(large[0].detach(), large[1].detach(), large[3]) == "sdpa"
    stage1 = _random_inputs(1, 49, 49, 64, 64, 2, 8, 8, 1)        # 64 queries, 64 routed keys per region
    stage2 = _random_inputs(1, 49, 49, 16, 16, 2, 8, 8, 4)        # 16 queries, 64 routed keys per region
    assert select_backend(stage1[0], stage1[1], stage1[3]) == "sdpa"
    with torch.no_grad():
        assert select_backend(stage1[0], stage1[1], stage1[3]) == "matmul"
        assert select_backend(stage2[0], stage2[1], stage2[3]) == "sdpa"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_quick_mode(tmp_path, dtype):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_bra.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--dtype", dtype, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stem = tmp_path / ("bra_quick" if dtype == "float32" else f"bra_quick_{dtype}")
    report = json.loads(stem.with_suffix(".json").read_text())
    methods = {row["method"] for row in report["rows"]}
    fast = set(FAST_BACKENDS) - ({"fused_cpu"} if dtype != "float32" else set())    # fused_cpu: float32 only
    assert methods == {*fast, "reference", "auto", "dense SDPA", "window SDPA"}   # triton: no CUDA here
    assert report["meta"]["threads"] == torch.get_num_threads() and report["meta"]["torch"] == torch.__version__
    assert report["meta"]["dtype"] == dtype
    assert stem.with_suffix(".md").read_text().count("| quick 14px |") == len(methods)
    assert stem.with_suffix(".png").stat().st_size > 0


def test_benchmark_reports_a_failing_method_and_times_the_rest(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_bra

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure\nsecond line")
    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "matmul", broken)
    rows = {row.method: row for row in bench_bra.run_setting(bench_bra.QUICK_SETTINGS[0], 1, 1.0, torch.device("cpu"))}
    assert rows["matmul"].note == "failed: RuntimeError: planted failure" and rows["matmul"].forward_ms is None
    assert rows["sdpa"].forward_ms > 0 and rows["sdpa"].train_ms > 0
    table = {row["method"]: row for row in bench_bra.summarize(list(rows.values()), 100.0)}
    assert table["matmul"]["forward_speedup"] is None and table["sdpa"]["forward_speedup"] > 0
