"""Gradio controls of the demo app (``app.py``) that Gradio lacks: number boxes and sliders whose range does
not refuse what the user types.

Gradio answers a value typed outside a control's minimum/maximum with an "Error" that blanks the outputs; these
pass it on to the app, which clamps it and shows the clamped value. The range still bounds the browser's
arrows and keys. Gradio writes a type stub beside the module of every component subclass: it is
``controls.pyi``, kept in the repository so that running the app writes nothing.
"""
from __future__ import annotations

import gradio as gr

__all__ = ["LenientNumber", "LenientSlider"]

from gradio.events import Dependency

class LenientNumber(gr.Number):
    """A gr.Number that passes values outside its range on to the app (drawn by the frontend as a gr.Number)."""

    is_template = True

    def preprocess(self, payload):
        return None if payload is None else self.round_to_precision(payload, self.precision)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class LenientSlider(gr.Slider):
    """A gr.Slider whose number box passes values outside its range, and an emptied box (None), on to the app
    (drawn as a gr.Slider)."""

    is_template = True

    def preprocess(self, payload):
        return None if payload is None else gr.Number.round_to_precision(payload, self.precision)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component