"""The bilevel demo: upload an image, see the top-5 predictions (or the predicted mask) beside the routed regions.

    python app.py                                   # the embedded demo model on http://127.0.0.1:7860
    python app.py --model biformer_tiny --checkpoint biformer_tiny.pth --port 7861

Model loading and the cached forward pass live in :mod:`bilevel.serving`, the drawing in
:mod:`bilevel.viz.routing_view`; this file wires them to the interface.
"""
from __future__ import annotations

import argparse
import threading
from collections import OrderedDict
from typing import Callable, Optional

import gradio as gr
import numpy as np
from PIL import Image

import bilevel
from bilevel.data.images import list_images, read_image, read_mask
from bilevel.data.shapes import SHAPE_CLASSES, builtin_shapes
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


def display_picture(picture: Image.Image) -> np.ndarray:
    """The picture at the interface's size: longer side DISPLAY_SIDE (small pictures enlarged), shorter side
    stretched to at least DISPLAY_MIN_SIDE so that a thin strip still shows its regions and takes clicks."""
    scale = DISPLAY_SIDE / max(picture.size)
    size = (max(DISPLAY_MIN_SIDE, round(picture.width * scale)), max(DISPLAY_MIN_SIDE, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.LANCZOS
    return np.asarray(picture.resize(size, resample))


#: what the interface says of a model served without a checkpoint
RANDOM_WEIGHTS_NOTE = ("random weights (no checkpoint loaded): its predictions mean nothing, only the routing "
                       "machinery is worth a look")


def describe_model(served: ServedModel) -> str:
    names = ", ".join(served.class_names[:6]) + (", ..." if len(served.class_names) > 6 else "")
    kind = "segmentation: " if served.task == "segmentation" else ""
    text = (f"**{served.name}** — {kind}{len(served.class_names)} classes ({names}); "
            f"input {served.input_size}x{served.input_size}")
    return f"{text}. **{RANDOM_WEIGHTS_NOTE.capitalize()}.**" if served.random_weights else text


def mask_picture(analysis: Analysis) -> np.ndarray:
    """A segmenter's predicted mask over the picture, with a legend of the classes it found (share of pixels)."""
    picture = display_picture(analysis.picture)
    num_classes = len(analysis.class_names)
    shares = analysis.probabilities.tolist()
    present = sorted((index for index in range(num_classes) if shares[index] > 0), key=lambda i: -shares[i])
    entries = [(index, f"{analysis.class_names[index]} {100 * shares[index]:.0f}%") for index in present]
    return draw_mask_legend(overlay_mask(picture, analysis.mask.numpy(), num_classes=num_classes), entries,
                            num_classes)


def prediction_outputs(analysis: Optional[Analysis]):
    """(predictions label, mask image) for an analysis: the mask is shown for segmentation models only."""
    if analysis is None or analysis.mask is None:
        return ({} if analysis is None else analysis.top(5)), gr.Image(value=None, visible=False)
    return analysis.top(5), gr.Image(value=mask_picture(analysis), visible=True)


def no_analysis(message: str) -> tuple:
    """What the analysis outputs show when there is nothing analysed: empty views and ``message``."""
    return None, *prediction_outputs(None), None, None, message, gr.Slider(), gr.Slider()


def routing_outputs(analysis: Optional[Analysis], stage: int, block: int, point_x: Optional[float],
                    point_y: Optional[float]):
    """(routes image, heat image, message, block slider) for the query point (fractions of the image size;
    an emptied box counts as the centre, 0.5)."""
    if analysis is None:
        return None, None, "Upload an image or pick an example first.", gr.Slider()
    layers = routing_layers(analysis.records)
    if not layers:
        return None, None, "This model records no routing.", gr.Slider()
    stage = int(stage)
    if stage not in {s for s, _ in layers}:
        stage = min(s for s, _ in layers)
    blocks = sorted(b for s, b in layers if s == stage)
    block = min(max(int(block), blocks[0]), blocks[-1])
    record = layers[stage, block]
    picture = display_picture(analysis.picture)
    point = tuple(0.5 if value is None else min(max(float(value), 0.0), 1.0) for value in (point_x, point_y))
    block_slider = gr.Slider(minimum=blocks[0], maximum=max(blocks[-1], blocks[0] + 1), value=block,
                             interactive=len(blocks) > 1)
    if record.kind == "lsda":
        grouped = draw_lsda_group(picture, record, point)
        message = (f"Stage {stage}, layer {block} ({record.module}): {record.extras['mode'].upper()} group of the "
                   "clicked token (CrossFormer routes nothing: it attends within groups).")
        return grouped, None, message, block_slider
    region = region_at(point, record)
    routes, heat = draw_routing(picture, record, region)
    routed = ", ".join(str(int(r)) for r in record.indices[0, region].tolist())
    rows, cols = record.region_grid
    message = (f"Stage {stage}, layer {block} ({record.module}, {record.kind}): query region {region} of the "
               f"{rows}x{cols} grid routes to regions {routed} (numbered best first).")
    if record.kind == "dbra":
        message += " Dots: its deformed sampling points."
    return routes, heat, message, block_slider


def build_demo(default: ServedModel, predictor: Optional[Predictor] = None,
               default_choice: str = EMBEDDED_MODEL) -> gr.Blocks:
    """The interface around ``default`` (the model every session starts with; ``default_choice`` names it)."""
    predictor = predictor or Predictor()
    shelf = ModelShelf(default)
    examples = builtin_examples()
    model_choices = list(EMBEDDED_MODELS) + list(bilevel.list_models())

    def analysed(picture: Optional[Image.Image], model_key: str, stage: int, block: int, x: float, y: float):
        try:
            if picture is None:
                raise ServingError("Upload an image or pick an example first.")
            analysis = predictor.analyse(shelf.get(model_key), fit_picture(picture))
        except ServingError as error:
            gr.Warning(str(error))
            return no_analysis(f"**Could not analyse the image:** {error}")
        layers = routing_layers(analysis.records)
        stages = sorted({s for s, _ in layers}) or [0]
        stage = int(stage) if int(stage) in stages else stages[0]
        stage_slider = gr.Slider(minimum=stages[0], maximum=max(stages[-1], stages[0] + 1), value=stage,
                                 interactive=len(stages) > 1)
        routes, heat, message, block_slider = routing_outputs(analysis, stage, block, x, y)
        if shelf.get(model_key).random_weights:
            message += f" The model has {RANDOM_WEIGHTS_NOTE}."
        return analysis, *prediction_outputs(analysis), routes, heat, message, stage_slider, block_slider

    def analyse_upload(path, model_key, stage, block, x, y):
        try:
            picture = read_upload(path) if path else None
        except ServingError as error:
            gr.Warning(str(error))
            return no_analysis(f"**Could not read the upload:** {error}")
        return analysed(picture, model_key, stage, block, x, y)

    def analyse_example(name, model_key, stage, block, x, y):
        if name not in examples:
            return no_analysis("Pick one of the listed examples.")
        return analysed(examples[name](), model_key, stage, block, x, y)

    def clicked(analysis, stage, block, evt: gr.SelectData):
        if analysis is None or evt.index is None:
            return gr.Number(), gr.Number(), *routing_outputs(analysis, stage, block, 0.5, 0.5)
        height, width = display_picture(analysis.picture).shape[:2]
        x, y = (evt.index[0] + 0.5) / width, (evt.index[1] + 0.5) / height
        return x, y, *routing_outputs(analysis, stage, block, x, y)

    def load_model(choice, checkpoint_path, current_key, analysis, stage, block, x, y):
        try:
            served = load_served_model(choice, checkpoint_path, label="the uploaded checkpoint")
            key = shelf.default.key if served.key == shelf.default.key else shelf.add(served)
        except ServingError as error:
            gr.Warning(str(error))
            return (current_key, gr.Markdown(), analysis, gr.Label(), gr.Image(), gr.Image(), gr.Image(),
                    f"**Could not load the model:** {error} (still serving the previous model)", gr.Slider(),
                    gr.Slider())
        picture = analysis.picture if analysis is not None else None
        outputs = (analysed(picture, key, stage, block, x, y) if picture is not None
                   else no_analysis("Model loaded: upload an image or pick an example."))
        return (key, describe_model(shelf.get(key)), *outputs)

    # analytics off: the demo runs offline and reports nothing to Gradio's servers
    with gr.Blocks(title="bilevel: bi-level routing attention", analytics_enabled=False) as demo:
        gr.Markdown("# Bi-level routing attention, live\nUpload an image or pick an example: the model's top-5 "
                    "classes (a segmentation model: its predicted mask), and for the region you click, the regions "
                    "its attention was routed to. Other models: the *Model* panel.")
        model_key = gr.State(default.key)
        analysis = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
                example = gr.Dropdown(list(examples), value=None, label="or pick an example")
                predictions = gr.Label(num_top_classes=5, label="Top-5 predictions (segmentation: share of the pixels)")
                mask_view = gr.Image(label="Predicted mask", type="numpy", interactive=False, format="png",
                                     visible=False, elem_id="mask")
                with gr.Accordion("Model", open=False, elem_id="model-panel"):
                    choice = gr.Dropdown(model_choices, value=default_choice, label="Model", elem_id="model-choice")
                    checkpoint = gr.File(label="Checkpoint (official .pth or bilevel fit .ckpt)",
                                         file_types=[".pth", ".pt", ".ckpt", ".bin"], type="filepath")
                    load = gr.Button("Load model")
                    model_info = gr.Markdown(describe_model(default))
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image or pick an example.")
                with gr.Row():
                    stage = gr.Slider(0, 3, value=0, step=1, label="Stage")
                    block = gr.Slider(0, 1, value=0, step=1, label="Block (attention layer of the stage)")
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
                                        format="png", elem_id="heat")
                with gr.Row():
                    point_x = gr.Number(0.5, label="Query point x (fraction of the width)", minimum=0, maximum=1,
                                        step=0.05)
                    point_y = gr.Number(0.5, label="Query point y (fraction of the height)", minimum=0, maximum=1,
                                        step=0.05)

        analysis_outputs = [analysis, predictions, mask_view, routes, heat, status, stage, block]
        view = [analysis, stage, block, point_x, point_y]
        # the latest upload, example or click wins: one made while another is computing is not dropped
        upload.upload(analyse_upload, [upload, model_key, stage, block, point_x, point_y], analysis_outputs,
                      api_name="analyse_upload", trigger_mode="always_last")
        upload.upload(lambda: gr.Dropdown(value=None), None, example, api_visibility="private")
        example.input(analyse_example, [example, model_key, stage, block, point_x, point_y], analysis_outputs,
                      api_name="analyse_example", trigger_mode="always_last")
        example.input(lambda: None, None, upload, api_visibility="private")
        routes.select(clicked, [analysis, stage, block], [point_x, point_y, routes, heat, status, block],
                      api_visibility="private", trigger_mode="always_last")
        for control in (stage, block):
            control.release(routing_outputs, view, [routes, heat, status, block], api_visibility="private",
                            trigger_mode="always_last")
        for control in (point_x, point_y):
            control.submit(routing_outputs, view, [routes, heat, status, block], api_visibility="private",
                           trigger_mode="always_last")
        gr.Button("Redraw", size="sm").click(routing_outputs, view, [routes, heat, status, block], api_name="route")
        load.click(load_model, [choice, checkpoint, model_key, analysis, stage, block, point_x, point_y],
                   [model_key, model_info] + analysis_outputs, api_name="load_model")
    return demo


def parse_args(args: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--model", default=None,
                        help="registered variant or embedded model name (default: the embedded demo classifier)")
    parser.add_argument("--checkpoint", default=None, help="official .pth or bilevel fit .ckpt for --model")
    parser.add_argument("--concurrency", type=int, default=2, help="requests computed at once (default 2)")
    return parser.parse_args(args)


def main(args: Optional[list[str]] = None) -> None:
    options = parse_args(args)
    try:
        default = load_served_model(options.model, options.checkpoint, label=options.checkpoint)
    except ServingError as error:
        raise SystemExit(f"app.py: {error}") from None
    demo = build_demo(default, default_choice=options.model or EMBEDDED_MODEL)
    demo.queue(default_concurrency_limit=options.concurrency, max_size=64)
    demo.launch(server_name=options.host, server_port=options.port, max_file_size=MAX_FILE_SIZE, show_error=True)


if __name__ == "__main__":
    main()
