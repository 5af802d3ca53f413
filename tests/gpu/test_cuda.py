"""On a CUDA device: every attention backend equals the reference, outputs and gradients; ``auto`` takes
``sdpa``; whole models agree with their reference-backend selves.

The CPU suite checks the same functions on the CPU. These tests need a GPU (a lent one: see
``benchmarks/gpu_check.sh``) and the golden data (``BILEVEL_REFERENCE`` may point to a copy of
``../shared/reference``). fp32 throughout, TF32 off; backends are held to a float64 reference as closely as
the fp32 reference is (``_compare_with_reference``).
"""
from __future__ import annotations

import pytest
import timm
import torch

import bilevel
from bilevel.ops.attention import ATTENTION_BACKENDS, select_backend
from tests.conftest import golden_cases, load_case
from tests.ops.test_backends import BRA_CASES, ODD_CASES, WEIGHTED, _compare_with_reference, _random_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
BACKENDS = sorted(set(ATTENTION_BACKENDS) - {"reference", "fused_cpu"})    # fused_cpu: a CPU kernel
# (batch, query regions, key regions, query tokens, key tokens, heads, qk head dim, v head dim, topk):
# BiFormer-T's stages at 224 px and stages 1-2 at 512 px, head size 32 (FlexAttention's sizes); regions of 64 and
# 256 tokens take flex's region-sized blocks, of 16 and 4 tokens its token-level mask
MODEL_SHAPES = {
    "224px_stage1": (2, 49, 49, 64, 64, 2, 32, 32, 1),
    "224px_stage2": (2, 49, 49, 16, 16, 4, 32, 32, 4),
    "224px_stage3": (2, 49, 49, 4, 4, 8, 32, 32, 16),
    "512px_stage1": (1, 64, 64, 256, 256, 2, 32, 32, 1),
    "512px_stage2": (1, 64, 64, 64, 64, 4, 32, 32, 4),
}
# FlexAttention compiles for head sizes that are powers of two, at least 16: the odd cases are not
FLEX_SHAPES = MODEL_SHAPES


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _compare(backend, shape, weighted=False):
    _compare_with_reference(backend, shape, weighted, device=CUDA)


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "flex"])
@pytest.mark.parametrize("shape", [*ODD_CASES.values(), *MODEL_SHAPES.values()],
                         ids=[*ODD_CASES, *MODEL_SHAPES])
def test_backends_match_reference_on_cuda(backend, shape):
    _compare(backend, shape)


@pytest.mark.parametrize("shape", FLEX_SHAPES.values(), ids=FLEX_SHAPES.keys())
def test_flex_matches_reference_on_cuda_and_trains(shape):
    _compare("flex", shape)


@pytest.mark.parametrize("backend", [name for name in WEIGHTED if name in BACKENDS])
def test_soft_routing_on_cuda(backend):
    _compare(backend, MODEL_SHAPES["224px_stage2"], weighted=True)


def test_auto_takes_sdpa_on_cuda():
    """The measured rule (bra_gpu.md): sdpa for every shape, plain or soft routing, inference or training."""
    for shape in MODEL_SHAPES.values():
        query, key, _, indices, weights = _random_inputs(*shape, weighted=True, device=CUDA)
        assert select_backend(query, key, indices) == "sdpa"
        assert select_backend(query, key, indices, weights) == "sdpa"
        assert select_backend(query.requires_grad_(), key.requires_grad_(), indices) == "sdpa"


def _assert_golden_on_cuda(module: torch.nn.Module, case: dict, golden_fill) -> None:
    """Fill ``module`` the golden way, run the case's input on CUDA and compare with the official output."""
    golden_fill.fill_(module)
    x = golden_fill.make_input(case["input"]["shape"], case["input"]["seed"])
    with torch.no_grad():
        out = module.eval().to(CUDA)(x.to(CUDA)).cpu()
    expected = golden_fill.decode_tensor(case["output"])
    torch.testing.assert_close(out, expected, atol=case["tolerance"]["atol"], rtol=case["tolerance"]["rtol"])


@pytest.mark.parametrize("path", BRA_CASES, ids=lambda p: p.stem)
def test_golden_op_cases_on_cuda(path, golden_fill):
    case = load_case(path)
    _assert_golden_on_cuda(bilevel.create_op(case["op"]["class"], **case["op"]["kwargs"]), case, golden_fill)


@pytest.mark.parametrize("path", golden_cases("model"), ids=lambda p: p.stem)
def test_golden_models_on_cuda(path, golden_fill):
    case = load_case(path)
    _assert_golden_on_cuda(bilevel.create_model(case["model"], **case.get("create_kwargs", {})), case, golden_fill)


@pytest.mark.parametrize("name", ["biformer_tiny", "debiformer_tiny"])
def test_training_step_on_cuda_matches_reference_backend(name):
    """Gradients of one forward+backward of a whole model, default backends against the reference backend."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(CUDA)
    grads = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        model = timm.create_model(name, attn_backend=backend).to(CUDA).eval()   # eval: no drop-path draws
        model(x).logsumexp(dim=-1).sum().backward()
        grads[backend] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert grads["auto"].keys() == grads["reference"].keys()
    for key, expected in grads["reference"].items():
        atol = 1e-4 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(grads["auto"][key], expected, atol=atol, rtol=1e-3, msg=key)
