"""CrossFormer's long-short distance attention (LSDA): token groups and dynamic position bias.

CrossFormer attends inside groups of ``G x G`` tokens (Wang et al., ICLR 2022). Two kinds of group
alternate from block to block:

* **SDA** (short distance): adjacent tokens, i.e. the map is cut into contiguous ``G x G`` tiles.
* **LDA** (long distance): tokens sampled every ``I`` pixels. With the map padded to a multiple of
  ``G * I``, group ``(rh, rw, ih, iw)`` holds the tokens at rows ``rh*G*I + a*I + ih`` and columns
  ``rw*G*I + b*I + iw`` for ``a, b = 0..G-1``.

SDA is LDA with ``I = 1``, so one grouping function serves both. Groups are ordered
``(rh, rw, ih, iw)`` and the tokens inside a group row-major in ``(a, b)``, as in the official code.
Maps whose shorter side is at most ``G`` fall back to SDA with G = that side (one group for a
square map; :func:`plan_groups`). Padding is zeros at the bottom/right; padded
keys get ``-1e6`` added to their logits (not ``-inf``: fully padded groups stay finite) and padded
queries are computed and cropped.

Layout: maps are NHWC ``(N, H, W, C)``; grouped tokens are ``(N, num_groups, G * G, C)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import merge_heads
from .linear import FusedLinear
from .recording import emit, is_recording
from .regions import pad_to_multiple, padding_to_multiple

__all__ = [
    "PADDED_KEY_BIAS",
    "V1_BUFFER_NAMES",
    "GroupLayout",
    "plan_groups",
    "group_tokens",
    "ungroup_tokens",
    "padded_key_bias",
    "relative_offsets",
    "relative_position_index",
    "DynamicPosBias",
    "GroupAttention",
    "attend_in_groups",
    "group_members",
    "token_groups",
]

#: added to the attention logits of padded keys (the official value; finite on purpose)
PADDED_KEY_BIAS = -1e6

#: per-attention buffers that the released (v1) checkpoints store and that are recomputed here
V1_BUFFER_NAMES = ("biases", "relative_position_index")


@dataclass(frozen=True)
class GroupLayout:
    """How one block groups an ``H x W`` map.

    mode:        "sda" (contiguous tiles) or "lda" (tokens sampled every ``interval`` pixels)
    group_size:  G, a group holds G x G tokens
    interval:    I (1 for SDA)
    map_size:    (H, W) before padding
    padded_size: (Hp, Wp), multiples of G * I
    """

    mode: str
    group_size: int
    interval: int
    map_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def group_grid(self) -> tuple[int, int]:
        """Groups along each axis: (Hp / G, Wp / G) (= (Rh * I, Rw * I))."""
        return self.padded_size[0] // self.group_size, self.padded_size[1] // self.group_size

    @property
    def num_groups(self) -> int:
        rows, cols = self.group_grid
        return rows * cols

    @property
    def is_padded(self) -> bool:
        return self.padded_size != self.map_size


def plan_groups(map_size: tuple[int, int], group_size: int, interval: int, long_distance: bool) -> GroupLayout:
    """The grouping a block with group size G and interval I applies to an ``H x W`` map.

    long_distance: the block's kind (the official blocks alternate SDA, LDA, SDA, ... per stage).
    If ``min(H, W) <= G`` the block falls back to SDA over one group of side ``max(H, W)``, the rule of
    the official segmentation backbone: a square map is one group, a non-square one is one group
    padded (and masked) along its shorter side.
    """
    height, width = (int(s) for s in map_size)
    if group_size < 1 or interval < 1:
        raise ValueError(f"group_size and interval must be positive, got {group_size} and {interval}")
    if min(height, width) <= group_size:
        group_size, interval, long_distance = max(height, width), 1, False
    if not long_distance:
        interval = 1
    unit = group_size * interval
    padded = (height + padding_to_multiple(height, unit), width + padding_to_multiple(width, unit))
    return GroupLayout("lda" if long_distance else "sda", group_size, interval, (height, width), padded)


def group_tokens(x: Tensor, layout: GroupLayout) -> Tensor:
    """Cut a padded map into the layout's groups.

    x: (N, Hp, Wp, C) with (Hp, Wp) = layout.padded_size
    returns: (N, num_groups, G * G, C), groups ordered (rh, rw, ih, iw), tokens row-major inside.
    """
    n, height, width, channels = x.shape
    if (height, width) != layout.padded_size:
        raise ValueError(f"group_tokens: expected a {layout.padded_size} map, got {height}x{width}")
    g, i = layout.group_size, layout.interval
    x = x.reshape(n, height // (g * i), g, i, width // (g * i), g, i, channels)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)                 # (N, Rh, Rw, Ih, Iw, Gh, Gw, C)
    return x.reshape(n, layout.num_groups, g * g, channels)


def ungroup_tokens(groups: Tensor, layout: GroupLayout) -> Tensor:
    """Inverse of :func:`group_tokens`: (N, num_groups, G * G, C) -> (N, Hp, Wp, C)."""
    n, _, _, channels = groups.shape
    g, i = layout.group_size, layout.interval
    height, width = layout.padded_size
    x = groups.reshape(n, height // (g * i), width // (g * i), i, i, g, g, channels)
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)                 # (N, Rh, Gh, Ih, Rw, Gw, Iw, C)
    return x.reshape(n, height, width, channels)


def padded_key_bias(layout: GroupLayout, device: Optional[torch.device] = None) -> Optional[Tensor]:
    """Additive logit bias of every key: PADDED_KEY_BIAS on padded tokens, 0 elsewhere.

    returns: (num_groups, G * G) float32, or None when nothing is padded.
    """
    if not layout.is_padded:
        return None
    height, width = layout.map_size
    padded = torch.ones(1, *layout.padded_size, 1, device=device)
    padded[:, :height, :width] = 0
    return group_tokens(padded, layout)[0, ..., 0] * PADDED_KEY_BIAS


def relative_offsets(group_size: int, device: Optional[torch.device] = None) -> Tensor:
    """Every (dy, dx) offset between two tokens of a G x G group, dy-major.

    returns: ((2G - 1)^2, 2) float32, columns (dy, dx) in [-(G - 1), G - 1] (the DPB input).
    """
    span = torch.arange(1 - group_size, group_size, device=device)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    return torch.stack([dy.flatten(), dx.flatten()], dim=1).float()


def relative_position_index(group_size: int, device: Optional[torch.device] = None) -> Tensor:
    """Row of :func:`relative_offsets` for every (query, key) pair of a G x G group.

    returns: (G^2, G^2) int64, ``(yq - yk + G - 1) * (2G - 1) + (xq - xk + G - 1)``.
    """
    coords = torch.arange(group_size, device=device)
    ys, xs = (c.flatten() for c in torch.meshgrid(coords, coords, indexing="ij"))
    dy = ys[:, None] - ys[None, :] + group_size - 1
    dx = xs[:, None] - xs[None, :] + group_size - 1
    return dy * (2 * group_size - 1) + dx


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                     dropout_p: float = 0.0) -> Tensor:
    """softmax(q kᵀ · scale + bias) v over small groups: q, k, v (..., heads, T, D), bias None or
    broadcast to (..., T, T).

    On CPU the explicit product is used: for groups of a few dozen tokens with a bias, PyTorch's fused CPU
    kernel measured about 1.6x slower than it (512 groups of 49 tokens, 3 heads of 32 channels; whole
    blocks side by side: ``benchmarks/bench_family_ops.py``). Elsewhere ``scaled_dot_product_attention``
    (fused, the attention matrix is never stored).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p)
    logits = (q * scale) @ k.transpose(-2, -1)
    weights = torch.softmax(logits if bias is None else logits + bias, dim=-1)
    return F.dropout(weights, dropout_p) @ v if dropout_p else weights @ v


def _pos_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm, ReLU, Linear (keys 0 and 2)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class DynamicPosBias(nn.Module):
    """CrossFormer's dynamic position bias: an MLP from a (dy, dx) offset to one bias per head.

    dim: the width the official attention passes (its own dim // 4); the MLP is dim // 4 wide,
    so pos_dim = attention dim // 16.
    offsets: (K, 2) -> (K, num_heads)
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_dim = dim // 4
        if self.pos_dim < 1:
            raise ValueError(f"DynamicPosBias: dim={dim} gives an empty MLP (pos_dim = dim // 4 = 0)")
        self.num_heads = num_heads
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = _pos_layer(self.pos_dim, self.pos_dim)
        self.pos2 = _pos_layer(self.pos_dim, self.pos_dim)
        self.pos3 = _pos_layer(self.pos_dim, num_heads)

    def forward(self, offsets: Tensor) -> Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class GroupAttention(nn.Module):
    """Multi-head self-attention inside each group, with dynamic position bias: the official
    crossformer.py ``Attention`` (same arguments, order and state-dict keys), built by
    ``bilevel.create_op("CrossFormerAttention", ...)``.

    dim, num_heads: width and heads (channels split head-major); scale head_dim ** -0.5 unless qk_scale.
    group_size: the G the block was built for (an int or a square (G, G) pair); its offset table and
    index are kept as the non-persistent buffers ``biases`` and ``relative_position_index`` (stored by
    the v1 checkpoints, dropped on load). Other group sizes (smaller or non-square maps) compute their
    tables on the fly. position_bias: False builds no DPB (no ``pos``, no buffers) and adds no bias.
    """

    def __init__(self, dim: int, group_size: Union[int, tuple[int, int]], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 position_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GroupAttention: dim={dim} is not divisible by num_heads={num_heads}")
        if isinstance(group_size, (tuple, list)):
            if len(group_size) != 2 or group_size[0] != group_size[1]:
                raise ValueError(f"GroupAttention: group_size must be an int G or a square pair (G, G), "
                                 f"got {tuple(group_size)}")
            group_size = group_size[0]
        self.dim, self.num_heads, self.group_size = dim, num_heads, group_size
        self.has_position_bias = position_bias
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads) if position_bias else None
        if position_bias:
            self.register_buffer("biases", relative_offsets(group_size), persistent=False)
            self.register_buffer("relative_position_index", relative_position_index(group_size), persistent=False)
        self.qkv = FusedLinear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = FusedLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the offset table and index in place: timm's hook after building on the meta device
        (``to_empty`` leaves them uninitialised; checkpoints do not hold them)."""
        if self.pos is not None:
            self.biases.copy_(relative_offsets(self.group_size, self.biases.device))
            self.relative_position_index.copy_(relative_position_index(self.group_size, self.biases.device))

    def position_bias(self, group_size: int) -> Optional[Tensor]:
        """DPB bias of every (query, key) pair of a G x G group: (num_heads, G^2, G^2); None without DPB."""
        if self.pos is None:
            return None
        if group_size == self.group_size:
            offsets, index = self.biases, self.relative_position_index
        else:
            offsets = relative_offsets(group_size, self.biases.device)
            index = relative_position_index(group_size, self.biases.device)
        tokens = group_size * group_size
        table = self.pos(offsets.to(self.pos.pos_proj.weight.dtype))   # ((2G-1)^2, heads)
        return table[index.reshape(-1)].reshape(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, groups: Tensor, group_size: int, key_bias: Optional[Tensor] = None) -> Tensor:
        """groups: (N, num_groups, G^2, C); key_bias: optional (num_groups, G^2) additive key mask.

        returns: (N, num_groups, G^2, C)
        """
        n, num_groups, tokens, channels = groups.shape
        qkv = self.qkv(groups).reshape(n, num_groups, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)             # (N, nG, heads, T, D) each
        logit_bias = self.position_bias(group_size)                   # (heads, T, T) or None
        if key_bias is not None:
            key_bias = key_bias[:, None, None, :].to(q.dtype)           # (nG, 1, 1, T)
            logit_bias = key_bias if logit_bias is None else logit_bias.to(q.dtype) + key_bias
        elif logit_bias is not None:
            logit_bias = logit_bias.to(q.dtype)
        out = biased_attention(q, k, v, logit_bias, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # released (v1) checkpoints store the two tables; they are recomputed, so drop them
        for name in V1_BUFFER_NAMES:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, group_size={self.group_size}, num_heads={self.num_heads}, "
                f"position_bias={self.has_position_bias}")


def attend_in_groups(x: Tensor, attention: GroupAttention, layout: GroupLayout,
                     key_bias: Optional[Tensor] = None) -> Tensor:
    """Grouped attention over a map: pad, group, attend, ungroup, crop.

    x: (N, H, W, C) (already normalised); key_bias: :func:`padded_key_bias` of the layout (pass a
    cached one, or None to compute it). returns: (N, H, W, C).
    """
    height, width = layout.map_size
    if key_bias is None and layout.is_padded:
        key_bias = padded_key_bias(layout, x.device)
    unit = layout.group_size * layout.interval
    groups = group_tokens(pad_to_multiple(x, (unit, unit)), layout)
    out = ungroup_tokens(attention(groups, layout.group_size, key_bias), layout)
    if is_recording():
        emit(attention, "lsda", layout.map_size, region_grid=layout.group_grid,
             region_size=(layout.group_size, layout.group_size), mode=layout.mode, group_size=layout.group_size,
             interval=layout.interval, padded_size=layout.padded_size)
    return out[:, :height, :width] if layout.is_padded else out


def group_members(layout: GroupLayout, row: int, col: int) -> Tensor:
    """The real (unpadded) tokens in the same group as token (row, col) under ``layout``.

    returns: (K, 2) int64 (row, col) coordinates, in the group's token order (K <= G^2).
    Computed with :func:`group_tokens` itself, so it shows exactly what the attention groups.
    """
    height, width = layout.map_size
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"token ({row}, {col}) is outside the {height}x{width} map")
    rows, cols = torch.meshgrid(torch.arange(layout.padded_size[0]), torch.arange(layout.padded_size[1]),
                                indexing="ij")
    coords = torch.stack([rows, cols], dim=-1)[None]                       # (1, Hp, Wp, 2)
    groups = group_tokens(coords, layout)[0]                               # (nG, G^2, 2)
    hit = ((groups[..., 0] == row) & (groups[..., 1] == col)).any(dim=1).nonzero()[0, 0]
    members = groups[hit]
    return members[(members[:, 0] < height) & (members[:, 1] < width)]


def token_groups(map_size: tuple[int, int], row: int, col: int, group_size: int = 7,
                 interval: int = 1) -> dict[str, Tensor]:
    """Token (row, col)'s group in an SDA block and in an LDA block of a stage (for drawing).

    map_size: (H, W) of the stage map; group_size, interval: the stage's G and I.
    returns: {"sda": (K, 2), "lda": (K, 2)} int64 (row, col) coordinates of the real tokens.
    """
    return {mode: group_members(plan_groups(map_size, group_size, interval, mode == "lda"), row, col)
            for mode in ("sda", "lda")}
