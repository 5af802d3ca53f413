"""A Linear layer whose CPU inference adds the bias (and applies GELU) inside the matrix product.

PyTorch's CPU ``F.linear`` first copies the bias into every row of a fresh output and then multiplies
into it (``addmm`` with beta=1): one extra write and read of the whole output. For BiFormer-T's stage-1
projections at batch 8 (25088 tokens, 64 -> 192 channels, a 19 MB output) that copy costs almost as much
as the product itself: 6.8 ms against 3.8 ms fused, on the project's 2 cores. oneDNN's matmul, which
PyTorch ships and Inductor's CPU path calls (``torch.ops.mkldnn._linear_pointwise``), adds the bias as it
writes each output tile, and can apply GELU there too, where ATen's GELU is one more pass over the output.

:class:`FusedLinear` uses it when nothing records gradients, for float32 CPU tensors outside autocast
and compilation; everywhere else (training, CUDA, other dtypes) it is ``nn.Linear``. It is an
``nn.Linear`` (same parameters, state-dict keys, initialisation and hooks); outputs agree with
``F.linear`` to float32 rounding. Under a dispatch mode (``FlopCounterMode``, fake tensors, ``torch.export``)
or a TorchScript trace (ONNX export) it stays with ``F.linear``, which those tools understand.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["FusedLinear", "fused_linear_available"]

#: activation -> the (attr, algorithm) arguments that select it in oneDNN's fused linear
ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none")}


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor, activation: Optional[str]) -> Tensor:
    attr, algorithm = ONEDNN_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


@functools.lru_cache(maxsize=1)
def fused_linear_available() -> bool:
    """True when this PyTorch build has oneDNN's fused linear and it agrees with ``F.linear`` (probed once)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 5, 8), (6, 8), (6,)))
    expected = F.linear(x, weight, bias)
    try:
        with torch.no_grad():
            plain, gelu = _onednn_linear(x, weight, bias, None), _onednn_linear(x, weight, bias, "gelu")
    except RuntimeError:
        return False
    return (torch.allclose(plain, expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(gelu, F.gelu(expected), rtol=1e-5, atol=1e-5))


def _runs_fused(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`FusedLinear` may take oneDNN's path for this call."""
    return (type(x) is Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode() and not torch.jit.is_tracing() and fused_linear_available())


class FusedLinear(nn.Linear):
    """``nn.Linear``, optionally followed by exact GELU (``activation="gelu"``), fused into the product in
    CPU inference. x: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None,
                 device=None, dtype=None):
        if activation not in ONEDNN_ACTIVATIONS:
            raise ValueError(f"FusedLinear: activation={activation!r} is not supported; choose None or 'gelu'")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None and _runs_fused(x, self.weight):
            return _onednn_linear(x, self.weight, self.bias, self.activation)
        out = F.linear(x, self.weight, self.bias)
        return out if self.activation is None else F.gelu(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation}")
