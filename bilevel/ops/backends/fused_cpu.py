"""Routed attention in one C++ kernel per call (CPU, float32): no routed copy of k and v.

The CPU side of the official to-do "fuse gather and attention". For every query region, head and block of
up to 64 query rows, ``csrc/routed_attention_cpu.cpp`` multiplies the queries with each routed key region
where it lies (a BLAS product per region, strided by the head), takes an exact softmax over all routed keys
and adds the routed value regions the same way. Nothing is gathered and no head is split or merged; the
score block stays in cache. PyTorch's fused CPU kernel, behind ``sdpa``, cuts fewer than 192 queries into
blocks of 32 rows, and ``sdpa`` first copies the routed regions. Key regions of fewer than 32 tokens would
make BLAS calls of a few rows each: those are copied, for one query region and head at a time, into a small
buffer that one product reads. When the query regions are small too (at most 9 tokens, heads of 32 or more
channels: BiFormer's stage 3 at 224 px), even that call costs more than its arithmetic, and the kernel
multiplies in AVX2 registers on the routed rows where they lie, 1.2-2.2x faster than through BLAS.

Backward (training) is :mod:`.recompute`'s: the kernel also returns the log-sum-exp, and backward re-selects
the routed regions chunk by chunk, so no routed copy is kept either.

The kernel is compiled on first use with the machine's C++ compiler, about 10 s, once per torch version
(the build is kept under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; ``make setup``
builds it). Where it cannot be built (no compiler, a failed build) or with ``BILEVEL_CPU_KERNEL=0``,
:func:`fused_cpu_available` is False, ``auto`` keeps to the other backends and ``backend="fused_cpu"`` raises
ValueError saying why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..attention import split_heads, tracks_gradients
from ._select import check_shapes, flat_region_indices, unit_channel_stride
from .recompute import routed_attention_backward

__all__ = ["fused_cpu_routed_attention", "fused_cpu_available", "fused_cpu_unavailable_reason", "build_kernel",
           "standard_ops_wanted", "SOURCE"]

logger = logging.getLogger(__name__)

#: the kernel's source, shipped with the package
SOURCE = Path(__file__).with_name("csrc") / "routed_attention_cpu.cpp"
#: set to 0 to never build or use the kernel
ENVIRONMENT_SWITCH = "BILEVEL_CPU_KERNEL"
KERNEL_NAME = "routed_attention_cpu"
_BUILD_LOCK = threading.Lock()
_BUILD_OUTCOME: list[Optional[str]] = []     # after the first attempt: [None] or [the reason it failed]


def _compiler_flags() -> list[str]:
    flags = ["-O3", "-ffast-math", "-fopenmp"]   # vectorized max and exp loops; OpenMP: at::parallel_for in parallel
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]       # AVX-512 code (-march=native) measured 10-20 % slower here
    return flags


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the ``ninja`` package's binary first (torch builds with ninja; a venv's bin may not be on PATH)."""
    path = os.environ.get("PATH", "")
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:          # then a ninja on PATH, if any
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = path


def build_directory() -> Path:
    """Where the kernel is built: under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one
    folder per torch version (the library is linked against that torch)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"bilevel_{KERNEL_NAME}_torch{torch.__version__.replace('+', '_')}"


def build_kernel() -> Optional[str]:
    """Compile (first time for this torch) and load the kernel, once per process; None when it is ready, else
    the reason it is not. Thread-safe: concurrent first calls (an app's first requests) wait for one build."""
    with _BUILD_LOCK:
        if not _BUILD_OUTCOME:
            _BUILD_OUTCOME.append(_build_and_load())
        return _BUILD_OUTCOME[0]


def _build_and_load() -> Optional[str]:
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return f"turned off by {ENVIRONMENT_SWITCH}=0"
    cpp_extension_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_logger.level
    cpp_extension_logger.setLevel(logging.ERROR)     # its import warns that a CPU-only machine has no CUDA
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_extension_logger.setLevel(level)
    directory = build_directory()
    try:
        if not (directory / f"{KERNEL_NAME}.so").exists():
            logger.warning("bilevel: compiling the fused_cpu attention kernel once for this torch, about 10 s, "
                           "into %s", directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            load(name=KERNEL_NAME, sources=[str(SOURCE)], extra_cflags=_compiler_flags(),
                 build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as error:   # no compiler or ninja, an unwritable cache, a failed build or load: others serve
        lines = [line for line in str(error).strip().splitlines() if not line.startswith("ninja:")] or [""]
        first_error = next((line for line in lines if "error:" in line), lines[-1])    # the compiler's own
        reason = f"its build failed ({type(error).__name__}: {first_error.strip()[:300]})"
        logger.warning("bilevel: the fused_cpu attention kernel is unavailable, %s; using the other backends",
                       reason)
        return reason

    @torch.library.register_fake("bilevel::routed_attention_forward")
    def _(query, key, value, indices, weights, scale, num_heads):   # shapes only, for torch.compile
        out = query.new_empty(*query.shape[:2], value.shape[-1])
        return out, query.new_empty(query.shape[0], num_heads, query.shape[1])
    return None


@torch.compiler.assume_constant_result   # torch.compile calls it while tracing, as Python, and keeps the result
def fused_cpu_unavailable_reason() -> Optional[str]:
    """None when the kernel is built and loaded, else why not (building it on first call)."""
    return build_kernel()


def standard_ops_wanted() -> bool:
    """True while a tool needs standard operators: ``torch.export``, a TorchScript trace (the ONNX exporter),
    a dispatch mode (``FlopCounterMode``, fake tensors). ``auto`` then leaves the kernel out; under
    ``torch.compile`` it stays, one opaque operator with a shape function."""
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False
    return is_in_torch_dispatch_mode() or torch.jit.is_tracing()


def fused_cpu_available() -> bool:
    """True when the kernel is built and loaded (building it on first call)."""
    return build_kernel() is None


def _forward(query: Tensor, key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor], scale: float,
             num_heads: int) -> tuple[Tensor, Tensor]:
    """(N, Rq, Tq, H * D), (N, Rk, Tk, H * D), (N, Rk, Tk, H * Dv), (B, topk), (B, topk) or None
    -> output (B, Tq, H * Dv), log-sum-exp (B, H, Tq), B = N * Rq."""
    batch = flat.shape[0]
    return torch.ops.bilevel.routed_attention_forward(
        query.reshape(batch, query.shape[2], query.shape[3]), key.reshape(-1, *key.shape[2:]),
        value.reshape(-1, *value.shape[2:]), flat, weights, scale, num_heads)


class _FusedRoutedAttention(torch.autograd.Function):
    """The kernel's forward with :mod:`.recompute`'s backward; shapes as :func:`_forward`."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, flat: Tensor, weights: Optional[Tensor],
                scale: float, num_heads: int) -> Tensor:
        out, log_sum_exp = _forward(query, key, value, flat, weights, scale, num_heads)
        ctx.save_for_backward(query, key, value, flat, weights, out, log_sum_exp)
        ctx.scale, ctx.num_heads = scale, num_heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        query, key, value, flat, weights, out, log_sum_exp = ctx.saved_tensors
        grads = routed_attention_backward(grad_output, query, key, value, flat, weights,
                                          split_heads(out, ctx.num_heads), log_sum_exp, ctx.scale, ctx.num_heads)
        return *grads, None, None


def fused_cpu_routed_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float,
                               num_heads: int, region_weights: Optional[Tensor] = None) -> Tensor:
    """Same function as ``reference_routed_attention``, on float32 CPU tensors.

    (N, Rq, Tq, H * Dqk), (N, Rk, Tk, H * Dqk), (N, Rk, Tk, H * Dv), (N, Rq, topk) -> (N, Rq, Tq, H * Dv).
    """
    check_shapes(query, key, value, indices, num_heads, region_weights, "fused_cpu")
    tensors = (query, key, value) + (() if region_weights is None else (region_weights,))
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        raise ValueError("fused_cpu: needs float32 CPU tensors; got "
                         f"{', '.join(sorted({f'{t.dtype} on {t.device}' for t in tensors}))}; use backend 'auto'")
    reason = fused_cpu_unavailable_reason()
    if reason is not None:
        raise ValueError(f"fused_cpu: the C++ kernel is unavailable: {reason}; use backend 'auto'")
    n, num_queries, query_tokens, _ = query.shape
    flat = flat_region_indices(indices.long(), key.shape[1]).reshape(n * num_queries, -1).contiguous()
    weights = None if region_weights is None else region_weights.reshape(flat.shape).contiguous()
    query, key, value = (unit_channel_stride(t) for t in (query, key, value))
    if tracks_gradients(query, key, value, region_weights):
        out = _FusedRoutedAttention.apply(query.contiguous(), key.contiguous(), value.contiguous(), flat, weights,
                                          float(scale), num_heads)
    else:
        out, _ = _forward(query, key, value, flat, weights, float(scale), num_heads)
    return out.view(n, num_queries, query_tokens, -1)

