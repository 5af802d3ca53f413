"""The bilevel demo: upload an image, see the top predictions (or the predicted mask) beside the routed regions.

    python app.py                                   # the embedded demo model on http://127.0.0.1:7860
    python app.py --model biformer_tiny --checkpoint biformer_tiny.pth --port 7861

Model loading and the cached forward pass live in :mod:`bilevel.serving`, the drawing in
:mod:`bilevel.viz.routing_view`; this file wires them to the interface.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import threading
from collections import OrderedDict
from typing import Callable, Optional

import gradio as gr
import numpy as np
from PIL import Image

import bilevel
from bilevel.controls import LenientNumber, LenientSlider
from bilevel.data.images import list_images, read_image, read_mask
from bilevel.data.shapes import SHAPE_CLASSES, builtin_shapes
from bilevel.ops.recording import RoutingRecord
from bilevel.runtime import retain_freed_memory
from bilevel.serving import (EMBEDDED_MODEL, EMBEDDED_MODELS, Analysis, Predictor, ServedModel, ServingError,
                             fit_picture, load_served_model, read_upload)
from bilevel.viz.images import SAMPLE_IMAGES, load_sample_image
from bilevel.viz.masks import draw_mask_legend, overlay_mask
from bilevel.viz.routing_view import draw_lsda_group, draw_routing, region_at, routing_layers

#: the longer side of the pictures the interface shows
DISPLAY_SIDE = 448
#: ... and the least its shorter side shows (thinner pictures are stretched across)
DISPLAY_MIN_SIDE = 96
#: uploads (images and checkpoints) larger than this are refused by the server
MAX_FILE_SIZE = "400mb"
#: the corner buttons of the result images: those that work offline (Gradio's "share" needs Hugging Face Spaces)
OFFLINE_BUTTONS = ["download", "fullscreen"]
#: what the status line says before anything is analysed
START_MESSAGE = "Upload an image or pick an example."
#: the query-point boxes step by 0.01 (arrows, keys), and clicks are rounded to it
POINT_DECIMALS = 2


def builtin_examples() -> dict[str, Callable[[], Image.Image]]:
    """Example name -> picture: scikit-image's sample photos, and per built-in shape class the first
    validation picture that shows that shape alone (its mask holds a single object)."""
    examples: dict[str, Callable[[], Image.Image]] = {
        f"photo: {name}": (lambda name=name: Image.fromarray(load_sample_image(name))) for name in SAMPLE_IMAGES}
    root = builtin_shapes()
    masks = root / "segmentation" / "val" / "masks"
    for name in SHAPE_CLASSES:
        alone = [path for path in list_images(root / "classification" / "val" / name)
                 if len(np.unique(read_mask(masks / path.name))) == 2]
        examples[f"shapes: {name}"] = lambda path=alone[0]: read_image(path)
    return examples


class ModelShelf:
    """The served models: the startup model always, plus the last few a user loaded (by key)."""

    def __init__(self, default: ServedModel, capacity: int = 3):
        self.default = default
        self.capacity = capacity
        self._loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, served: ServedModel) -> str:
        with self._lock:
            self._loaded[served.key] = served
            self._loaded.move_to_end(served.key)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return served.key

    def get(self, key: Optional[str]) -> ServedModel:
        if not key or key == self.default.key:
            return self.default
        with self._lock:
            if key not in self._loaded:
                raise ServingError("the model you loaded was unloaded to make room for others: load it again")
            return self._loaded[key]


#: what a page asked to see: ("upload", file path) or ("example", name); None: nothing (the upload cleared)
PictureSource = Optional[tuple[str, str]]


class PageRequests:
    """What each browser page (session) last asked to see, and the model it serves, so that an analysis the page has
    moved past is not drawn over what came after it.

    The page's own (private) events record each request as the user makes it: a picture uploaded, an example picked,
    the upload cleared. An analysis takes the number of its page's latest request of its kind (recorded when the
    user acted, however long it then waited in the queue) and is drawn only if that request is still the page's
    newest and the page still serves the model it used. API calls record no request: their results always come back.
    """

    def __init__(self):
        self._numbers = itertools.count(1)
        self._latest: dict[str, tuple[int, PictureSource]] = {}
        self._latest_of_kind: dict[tuple[str, str], int] = {}
        self._models: dict[str, str] = {}
        self._lock = threading.Lock()

    def ask(self, session: str, kind: str, source: PictureSource) -> None:
        """Record the page's newest request: ``kind`` "upload", "example" or "clear", showing ``source``."""
        with self._lock:
            number = next(self._numbers)
            self._latest[session] = (number, source)
            self._latest_of_kind[session, kind] = number

    def ticket(self, session: str, kind: str) -> Optional[int]:
        """The number of the page's latest request of ``kind``; None for a session that made none (an API call)."""
        with self._lock:
            return self._latest_of_kind.get((session, kind))

    def latest(self, session: str) -> tuple[Optional[int], PictureSource]:
        """(number, source) of the page's newest request; (None, None) before any."""
        with self._lock:
            return self._latest.get(session, (None, None))

    def model_key(self, session: str) -> Optional[str]:
        """The key of the model the session serves (None: the startup model)."""
        with self._lock:
            return self._models.get(session)

    def serve_model(self, session: str, key: str) -> None:
        with self._lock:
            self._models[session] = key

    def is_current(self, session: str, ticket: Optional[int], model_key: Optional[str]) -> bool:
        """Whether an analysis of request ``ticket`` made with ``model_key`` is still what the page wants drawn."""
        with self._lock:
            return ticket is None or (self._latest.get(session, (None, None))[0] == ticket
                                      and self._models.get(session) == model_key)

    def forget(self, session: str) -> None:
        """Drop a closed page's requests and model choice."""
        with self._lock:
            self._latest.pop(session, None)
            self._models.pop(session, None)
            for kind in [kind for owner, kind in self._latest_of_kind if owner == session]:
                del self._latest_of_kind[session, kind]


def display_picture(picture: Image.Image) -> np.ndarray:
    """The picture at the interface's size: longer side DISPLAY_SIDE (small pictures enlarged), shorter side
    stretched to at least DISPLAY_MIN_SIDE so that a thin strip still shows its regions and takes clicks."""
    scale = DISPLAY_SIDE / max(picture.size)
    size = (max(DISPLAY_MIN_SIDE, round(picture.width * scale)), max(DISPLAY_MIN_SIDE, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.LANCZOS
    return np.asarray(picture.resize(size, resample))


def on_point_step(fraction: float) -> float:
    """A query-point fraction rounded to the boxes' step, so that the box accepts what a click writes."""
    return round(fraction, POINT_DECIMALS)


#: names each file upload after its visible label for screen readers (Gradio names them all "Click to upload or
#: drop files"), again whenever Gradio redraws one
NAME_FILE_UPLOADS_JS = """() => {
    const name = () => document.querySelectorAll("button.upload-container").forEach((button) => {
        const label = button.closest(".block")?.querySelector("[data-testid=block-label]")?.textContent.trim();
        if (label && button.getAttribute("aria-label") !== label) {
            button.setAttribute("aria-label", label);
            button.querySelector("input[type=file]")?.setAttribute("aria-label", label);
        }
    });
    name();
    new MutationObserver(name).observe(document.body, {childList: true, subtree: true});
}"""


#: what the interface says of a model served without a checkpoint
RANDOM_WEIGHTS_NOTE = ("random weights (no checkpoint loaded): its predictions mean nothing, only the routing "
                       "machinery is worth a look")


def describe_model(served: ServedModel) -> str:
    names = ", ".join(served.class_names[:6]) + (", ..." if len(served.class_names) > 6 else "")
    kind = "segmentation: " if served.task == "segmentation" else ""
    text = (f"**{served.name}** — {kind}{len(served.class_names)} classes ({names}); "
            f"input {served.input_size}x{served.input_size}")
    return f"{text}. **{RANDOM_WEIGHTS_NOTE.capitalize()}.**" if served.random_weights else text


def predictions_label(segmenter: bool, num_classes: int) -> str:
    """The caption of the predictions: a classifier's top classes, or a segmenter's classes by share of pixels."""
    if segmenter:
        return "Classes in the predicted mask (share of the pixels)"
    return f"Top-{min(5, num_classes)} predictions"


def served_predictions_label(served: ServedModel) -> str:
    return predictions_label(served.task == "segmentation", len(served.class_names))


def mask_entries(analysis: Analysis) -> list[tuple[int, str]]:
    """(class index, "name share%") of each class in a segmenter's mask, largest share first."""
    shares = analysis.probabilities.tolist()
    present = sorted((index for index, share in enumerate(shares) if share > 0), key=lambda i: -shares[i])
    return [(index, f"{analysis.class_names[index]} {100 * shares[index]:.0f}%") for index in present]


def mask_picture(analysis: Analysis, entries: list[tuple[int, str]]) -> np.ndarray:
    """A segmenter's predicted mask over the picture, with a legend of ``entries`` (:func:`mask_entries`)."""
    num_classes = len(analysis.class_names)
    mask = overlay_mask(display_picture(analysis.picture), analysis.mask.numpy(), num_classes=num_classes)
    return draw_mask_legend(mask, entries, num_classes)


def prediction_outputs(analysis: Optional[Analysis]):
    """(predictions label, mask image) for an analysis: the mask is shown for segmentation models only."""
    if analysis is None:
        return gr.Label(value={}), gr.Image(value=None, visible=False)
    label = gr.Label(value=analysis.top(5), label=predictions_label(analysis.mask is not None,
                                                                    len(analysis.class_names)))
    if analysis.mask is None:
        return label, gr.Image(value=None, visible=False)
    entries = mask_entries(analysis)
    alt_text = ("Predicted mask over the picture in grey, classes by share of the pixels: "
                + ", ".join(text for _, text in entries) + ".")
    return label, gr.Image(value=mask_picture(analysis, entries), visible=True, alt_text=alt_text)


def no_analysis(message: str) -> tuple:
    """What the analysis outputs show when there is nothing analysed: empty views and ``message``."""
    return None, *prediction_outputs(None), gr.Number(), gr.Number(), None, None, message, gr.Slider(), gr.Slider()


def nearest(values: list[float], value: float) -> float:
    """The one of ``values`` closest to ``value`` (the smaller on a tie)."""
    return min(values, key=lambda candidate: (abs(candidate - value), candidate))


def corrected(component: type, asked: Optional[float], drawn: float, write_back: bool = False, **update):
    """An update of a control holding ``asked``: ``update``, and the value ``drawn`` where it differs (always, with
    ``write_back``). A value the user is still changing is not written back, as that would undo their next key
    presses."""
    if write_back or (asked is not None and drawn != asked):
        update["value"] = drawn
    return component(**update)


def choice_slider(values: list[int], asked: float, drawn: int, write_back: bool = False) -> gr.Slider:
    """An update of a slider to range over the sorted ``values`` (fixed when there is one) and show ``drawn``."""
    return corrected(gr.Slider, asked, drawn, write_back, minimum=values[0], maximum=max(values[-1], values[0] + 1),
                     interactive=len(values) > 1)


def routing_outputs(analysis: Optional[Analysis], stage: Optional[float], block: Optional[float],
                    point_x: Optional[float], point_y: Optional[float], write_back: bool = False):
    """(query point x, y, routes image, heat image, message, stage slider, block slider) of the query point
    (fractions of the image size; an emptied box counts as the centre, 0.5) on layer ``block`` of ``stage`` (an
    emptied box: the first).

    Values out of range are moved to the nearest the model has (points into [0, 1]), and their controls show it;
    with ``write_back``, the controls are set to the drawn values in any case.
    """
    if analysis is None:
        return (gr.Number(), gr.Number(), None, None, "Upload an image or pick an example first.", gr.Slider(),
                gr.Slider())
    layers = routing_layers(analysis.records)
    if not layers:
        return gr.Number(), gr.Number(), None, None, "This model records no routing.", gr.Slider(), gr.Slider()
    stages = sorted({s for s, _ in layers})
    drawn_stage = nearest(stages, stages[0] if stage is None else stage)
    blocks = sorted(b for s, b in layers if s == drawn_stage)
    drawn_block = nearest(blocks, blocks[0] if block is None else block)
    record = layers[drawn_stage, drawn_block]
    point = tuple(0.5 if value is None else min(max(value, 0.0), 1.0) for value in (point_x, point_y))
    controls = tuple(corrected(gr.Number, asked, drawn, write_back) for asked, drawn in zip((point_x, point_y), point))
    sliders = (choice_slider(stages, stage, drawn_stage, write_back),
               choice_slider(blocks, block, drawn_block, write_back))
    layer = f"Stage {drawn_stage}, layer {drawn_block} ({record.module}"
    return *controls, *layer_view(display_picture(analysis.picture), record, point, layer), *sliders


def layer_view(picture: np.ndarray, record: RoutingRecord, point: tuple[float, float], layer: str):
    """(routes image, heat image, message) of one layer's ``record`` at the query point; ``layer`` names it in the
    message. CrossFormer's LSDA layers route nothing: their view is the group of the token under the point."""
    if record.kind == "lsda":
        mode = record.extras["mode"].upper()
        grouped = gr.Image(value=draw_lsda_group(picture, record, point), alt_text=(
            f"The {mode} group of the token at the query point, tinted yellow over the picture; the token in blue."))
        return grouped, None, f"{layer}): {mode} group of the clicked token (CrossFormer routes nothing: it attends " \
                              "within groups)."
    region = region_at(point, record)
    routes, heat = draw_routing(picture, record, region)
    routed = ", ".join(str(int(r)) for r in record.indices[0, region].tolist())
    grid = "x".join(str(side) for side in record.region_grid)
    message = (f"{layer}, {record.kind}): query region {region} of the {grid} grid routes to regions {routed} "
               "(numbered best first).")
    if record.kind == "dbra":
        message += " Dots: its deformed sampling points."
    routes = gr.Image(value=routes, alt_text=(f"Routed regions over the picture: query region {region} of the {grid} "
                                              f"grid in blue, the regions it routes to ({routed}, best first) in "
                                              "yellow."))
    heat = gr.Image(value=heat, alt_text=f"Region affinity of query region {region} to every region of the {grid} "
                                         "grid, as a heat map over the picture (bright: high).")
    return routes, heat, message


def build_demo(default: ServedModel, predictor: Optional[Predictor] = None,
               default_choice: str = EMBEDDED_MODEL) -> gr.Blocks:
    """The interface around ``default`` (the model every session starts with; ``default_choice`` names it)."""
    predictor = predictor or Predictor()
    shelf = ModelShelf(default)
    examples = builtin_examples()
    model_choices = list(EMBEDDED_MODELS) + list(bilevel.list_models())
    pages = PageRequests()

    def analysed(picture: Optional[Image.Image], model_key: Optional[str], stage: int, block: int, x: float,
                 y: float):
        """The analysis outputs of ``picture`` on the model ``model_key``, drawn at the given view (the controls are
        set to what is drawn: a value changed while the network ran would otherwise disagree with the view)."""
        try:
            if picture is None:
                raise ServingError("Upload an image or pick an example first.")
            analysis = predictor.analyse(shelf.get(model_key), fit_picture(picture))
        except ServingError as error:
            gr.Warning(str(error))
            return no_analysis(f"**Could not analyse the image:** {error}")
        *view, message, stage_slider, block_slider = routing_outputs(analysis, stage, block, x, y, write_back=True)
        if shelf.get(model_key).random_weights:
            message += f" The model has {RANDOM_WEIGHTS_NOTE}."
        return analysis, *prediction_outputs(analysis), *view, message, stage_slider, block_slider

    def analysed_source(source: PictureSource, model_key: Optional[str], stage, block, x, y):
        """The analysis outputs of an uploaded file or a named example (:data:`PictureSource`)."""
        kind, name = source
        if kind == "example":
            if name not in examples:
                return no_analysis("Pick one of the listed examples.")
            return analysed(examples[name](), model_key, stage, block, x, y)
        try:
            picture = read_upload(name)
        except ServingError as error:
            gr.Warning(str(error))
            return no_analysis(f"**Could not read the upload:** {error}")
        return analysed(picture, model_key, stage, block, x, y)

    def analyse_request(kind: str, name: Optional[str], stage, block, x, y, request: gr.Request):
        session = request.session_hash
        ticket, model_key = pages.ticket(session, kind), pages.model_key(session)
        if name is None:
            # a page re-sends a deferred upload with the box's value at that time: emptied since, it asks nothing
            return nothing_new() if ticket is not None else no_analysis("Upload an image or pick an example first.")
        outputs = analysed_source((kind, name), model_key, stage, block, x, y)
        return outputs if pages.is_current(session, ticket, model_key) else nothing_new()

    def analyse_upload(path, stage, block, x, y, request: gr.Request):
        return analyse_request("upload", path, stage, block, x, y, request)

    def analyse_example(name, stage, block, x, y, request: gr.Request):
        return analyse_request("example", name, stage, block, x, y, request)

    def uploaded(path, request: gr.Request):
        if path is None:
            return gr.skip()
        pages.ask(request.session_hash, "upload", ("upload", path))
        return gr.Dropdown(value=None)

    def example_picked(name, request: gr.Request):
        if name is None:
            return gr.skip()
        pages.ask(request.session_hash, "example", ("example", name))
        return None

    def cleared(request: gr.Request):
        pages.ask(request.session_hash, "clear", None)
        return no_analysis(START_MESSAGE)

    def page_closed(request: gr.Request):
        pages.forget(request.session_hash)

    def clicked(analysis, stage, block, evt: gr.SelectData):
        if analysis is None:
            return routing_outputs(analysis, stage, block, 0.5, 0.5)
        if evt.index is None:      # a click Gradio could not place on the picture (one still loading): no change
            return tuple(gr.skip() for _ in view_outputs)
        height, width = display_picture(analysis.picture).shape[:2]
        x, y = (on_point_step((index + 0.5) / side) for index, side in zip(evt.index, (width, height)))
        return x, y, *routing_outputs(analysis, stage, block, x, y)[2:]

    def load_model(choice, checkpoint_path, analysis, stage, block, x, y, request: gr.Request):
        """Serve another model to this session and show the page's latest picture on it (for an API session, the
        picture of its last analysis)."""
        session = request.session_hash
        try:
            served = load_served_model(choice, checkpoint_path, label="the uploaded checkpoint")
            key = shelf.default.key if served.key == shelf.default.key else shelf.add(served)
        except ServingError as error:
            gr.Warning(str(error))
            *unchanged, _, stage_slider, block_slider = nothing_new()
            return (gr.Markdown(), *unchanged,
                    f"**Could not load the model:** {error} (still serving the previous model)", stage_slider,
                    block_slider)
        pages.serve_model(session, key)
        number, source = pages.latest(session)
        if source is not None:
            outputs = analysed_source(source, key, stage, block, x, y)
            if not pages.is_current(session, number, key):     # the page asked for something else meanwhile
                outputs = nothing_new()
        elif number is None and analysis is not None:
            outputs = analysed(analysis.picture, key, stage, block, x, y)
        else:
            _, _, *cleared_view = no_analysis("Model loaded: upload an image or pick an example.")
            outputs = (None, gr.Label(value={}, label=served_predictions_label(served)), *cleared_view)
        return describe_model(served), *outputs

    # analytics off: the demo runs offline and reports nothing to Gradio's servers
    with gr.Blocks(title="bilevel: bi-level routing attention", analytics_enabled=False) as demo:
        gr.Markdown("# Bi-level routing attention, live\nUpload an image or pick an example: the model's top "
                    "classes, up to five (a segmentation model: its predicted mask), and for the region you click, "
                    "the regions its attention was routed to. Other models: the *Model* panel.")
        analysis = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                example = gr.Dropdown(list(examples), value=None, label="or pick an example", elem_id="example")
                predictions = gr.Label(num_top_classes=5, label=served_predictions_label(default))
                mask_view = gr.Image(label="Predicted mask", type="numpy", interactive=False, format="png",
                                     visible=False, elem_id="mask", buttons=OFFLINE_BUTTONS)
                with gr.Accordion("Model", open=False, elem_id="model-panel"):
                    choice = gr.Dropdown(model_choices, value=default_choice, label="Model", elem_id="model-choice")
                    checkpoint = gr.File(label="Checkpoint (official .pth or bilevel fit .ckpt)",
                                         file_types=[".pth", ".pt", ".ckpt", ".bin"], type="filepath")
                    load = gr.Button("Load model")
                    model_info = gr.Markdown(describe_model(default))
            with gr.Column(scale=2):
                status = gr.Markdown(START_MESSAGE)
                with gr.Row():
                    stage = LenientSlider(0, 3, value=0, step=1, label="Stage")
                    block = LenientSlider(0, 1, value=0, step=1, label="Block (attention layer of the stage)")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Routed regions** (blue: query region; yellow: its top-k, ranked). "
                                    "Click a region to query it.")
                        # no corner buttons: they would cover the top-right regions, which a click must reach
                        routes = gr.Image(label="Routed regions", show_label=False, type="numpy", interactive=False,
                                          format="png", elem_id="routes", buttons=[])
                    with gr.Column():
                        gr.Markdown("**Region affinity** of the query region to every region (bright: high).")
                        heat = gr.Image(label="Region affinity", show_label=False, type="numpy", interactive=False,
                                        format="png", elem_id="heat", buttons=OFFLINE_BUTTONS)
                with gr.Row():
                    point_x = LenientNumber(0.5, label="Query point x (fraction of the width)", minimum=0,
                                                maximum=1, step=10 ** -POINT_DECIMALS)
                    point_y = LenientNumber(0.5, label="Query point y (fraction of the height)", minimum=0,
                                                maximum=1, step=10 ** -POINT_DECIMALS)

        view_outputs = [point_x, point_y, routes, heat, status, stage, block]
        analysis_outputs = [analysis, predictions, mask_view] + view_outputs

        def nothing_new() -> tuple:
            """No change to any analysis output."""
            return tuple(gr.skip() for _ in analysis_outputs)

        view = [analysis, stage, block, point_x, point_y]
        # the latest upload, example or click wins: one made while another is computing is not dropped.
        # A trigger's events run in turn, each after the one before has finished: the quick ones come first.
        # An analysis still running when the picture is cleared or replaced must not draw over the newer state; Gradio's
        # `cancels` would stop it, but (Gradio 6.31) can leave "Error" on every output, so the stale result is skipped.
        upload.upload(uploaded, upload, example, api_visibility="private")
        upload.upload(analyse_upload, [upload, stage, block, point_x, point_y], analysis_outputs,
                      api_name="analyse_upload", trigger_mode="always_last")
        example.input(example_picked, example, upload, api_visibility="private")
        example.input(analyse_example, [example, stage, block, point_x, point_y], analysis_outputs,
                      api_name="analyse_example", trigger_mode="always_last")
        upload.clear(cleared, None, analysis_outputs, api_visibility="private")
        routes.select(clicked, [analysis, stage, block], view_outputs, api_visibility="private",
                      trigger_mode="always_last")
        # input: changes the user makes (mouse, keys, spin arrows, typing), not those the app writes back
        for control in (stage, block, point_x, point_y):
            control.input(routing_outputs, view, view_outputs, api_visibility="private", trigger_mode="always_last")
        gr.Button("Redraw", size="sm").click(routing_outputs, view, view_outputs, api_name="route")
        demo.load(None, js=NAME_FILE_UPLOADS_JS, api_visibility="private")
        demo.unload(page_closed)
        load.click(load_model, [choice, checkpoint, analysis, stage, block, point_x, point_y],
                   [model_info] + analysis_outputs, api_name="load_model")
    return demo


def whole_number(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: a whole number, at least ``low`` (and at most ``high``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is less than {low}" if high is None
                                             else f"{value} is not in {low}-{high}")
        return value
    return parse


def parse_args(args: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=whole_number(1, 65535), default=7860, help="port, 1-65535 (default 7860)")
    parser.add_argument("--model", default=None,
                        help="registered variant or embedded model name (default: the embedded demo classifier)")
    parser.add_argument("--checkpoint", default=None, help="official .pth or bilevel fit .ckpt for --model")
    parser.add_argument("--concurrency", type=whole_number(1), default=2,
                        help="requests computed at once, at least 1 (default 2)")
    return parser.parse_args(args)


def port_taken_message(host: str, port: int) -> str:
    """The one line app.py ends with when it cannot serve on ``port``."""
    other = port + 1 if port < 65535 else port - 1
    return (f"app.py: port {port} on {host} is in use (or {host} is not an address of this machine): choose another "
            f'with --port (make demo DEMO_ARGS="--port {other}")')


def main(args: Optional[list[str]] = None) -> None:
    options = parse_args(args)
    retain_freed_memory()
    try:
        default = load_served_model(options.model, options.checkpoint, label=options.checkpoint)
    except ServingError as error:
        raise SystemExit(f"app.py: {error}") from None
    demo = build_demo(default, default_choice=options.model or EMBEDDED_MODEL)
    demo.queue(default_concurrency_limit=options.concurrency, max_size=64)
    try:
        demo.launch(server_name=options.host, server_port=options.port, max_file_size=MAX_FILE_SIZE, show_error=True)
    except OSError:     # Gradio's answer to a port it cannot bind
        print(port_taken_message(options.host, options.port), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
