"""Record what the attention layers decided during one forward pass, for drawing it.

    with record_routing(model) as trace:
        logits = model(images)
    for record in trace:            # one RoutingRecord per attention call, in call order
        record.module, record.indices.shape

Attention modules call :func:`emit`; it does nothing unless a recording is active in the current
thread or task (a ``ContextVar``), so models pay nothing when nobody is watching and concurrent
requests (the app) never see each other's records.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["RoutingRecord", "RoutingTrace", "record_routing", "emit", "is_recording"]


@dataclass
class RoutingRecord:
    """What one attention module decided in one call.

    module:      the module's qualified name in the recorded model ("stages.1.0.attn"), or its class name
    kind:        "bra", "nchw_bra", "dbra", "lsda", ... (which fields of ``extras`` to expect)
    map_size:    (H, W) of the feature map the module saw, before any padding
    region_grid: (Sh, Sw) routing regions, counted on the padded map
    region_size: (h, w) tokens per region on the padded map
    indices:     (N, Sh * Sw, topk) routed key regions, best first (None when the module does not route)
    logits:      (N, Sh * Sw, Sh * Sw) region affinity (None when the module does not route)
    extras:      module-specific tensors (DBRA sampling points, CrossFormer groups, ...)
    """

    module: str
    kind: str
    map_size: tuple[int, int]
    region_grid: Optional[tuple[int, int]] = None
    region_size: Optional[tuple[int, int]] = None
    indices: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    extras: dict[str, Any] = field(default_factory=dict)


class RoutingTrace(list):
    """The records of one forward pass, in call order (a plain list with lookups)."""

    def by_kind(self, kind: str) -> list[RoutingRecord]:
        return [record for record in self if record.kind == kind]

    def by_module(self, name: str) -> RoutingRecord:
        for record in self:
            if record.module == name:
                return record
        raise KeyError(f"no record for module {name!r}; recorded: {[r.module for r in self]}")


@dataclass
class _Recorder:
    trace: RoutingTrace
    names: dict[int, str]


_ACTIVE: ContextVar[Optional[_Recorder]] = ContextVar("bilevel_routing_recorder", default=None)


def is_recording() -> bool:
    """True inside :func:`record_routing` (always False while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def record_routing(model: Optional[nn.Module] = None) -> Iterator[RoutingTrace]:
    """Collect a :class:`RoutingRecord` for every attention call made inside the block.

    model: optional; when given, records carry the modules' qualified names within it.
    """
    names = {id(module): name for name, module in model.named_modules()} if model is not None else {}
    token = _ACTIVE.set(_Recorder(RoutingTrace(), names))
    try:
        yield _ACTIVE.get().trace
    finally:
        _ACTIVE.reset(token)


def emit(module: nn.Module, kind: str, map_size: tuple[int, int], **fields: Any) -> None:
    """Add a record for ``module`` if a recording is active. Tensors are detached.

    fields: region_grid, region_size, indices, logits, and anything else (goes to ``extras``).
    """
    if not is_recording():
        return
    recorder = _ACTIVE.get()
    known = {"region_grid", "region_size", "indices", "logits"}
    detached = {key: value.detach() if isinstance(value, Tensor) else value for key, value in fields.items()}
    record = RoutingRecord(
        module=recorder.names.get(id(module), type(module).__name__),
        kind=kind,
        map_size=tuple(int(s) for s in map_size),
        extras={key: value for key, value in detached.items() if key not in known},
        **{key: value for key, value in detached.items() if key in known},
    )
    recorder.trace.append(record)
