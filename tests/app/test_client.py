"""The launched app driven over HTTP with gradio_client: uploads, redraws, bad files, eight users at once."""
from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def client(launched_app):
    return Client(launched_app[0], verbose=False)


def value(output):
    """An output's value: the value of a component update (a dict), else the output itself."""
    return output.get("value") if isinstance(output, dict) and "__type__" in output else output


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(value(output)).convert("RGB"))


def test_upload_returns_predictions_and_overlays_and_a_redraw_reuses_the_pass(client, launched_app, shape_pictures):
    predictor = launched_app[1]
    labels, mask, _, _, routes, heat, message, _, _ = client.predict(
        handle_file(str(shape_pictures["square"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload")
    assert value(labels)["label"] == "square" and len(value(labels)["confidences"]) == 4
    assert mask["visible"] is False, "a classifier shows no mask"
    assert pixels(routes).shape == pixels(heat).shape and pixels(routes).shape[1] == 448
    assert "query region 36 of the 8x8 grid" in message
    passes = predictor.forward_passes
    _, _, other_routes, other_heat, other_message, _, _ = client.predict(1, 0, 0.05, 0.05, api_name="/route")
    assert "Stage 1, layer 0 (stages.1.0.attn, bra)" in other_message and "query region 0 " in other_message
    assert not np.array_equal(pixels(other_routes), pixels(routes))
    assert not np.array_equal(pixels(other_heat), pixels(heat))
    assert predictor.forward_passes == passes


def test_an_emptied_query_box_counts_as_the_centre(client, shape_pictures):
    client.predict(handle_file(str(shape_pictures["square"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload")
    *_, centre, _, _ = client.predict(0, 0, 0.5, 0.5, api_name="/route")
    *_, emptied, _, _ = client.predict(0, 0, None, None, api_name="/route")
    assert emptied == centre and "query region 36 " in emptied


def test_values_out_of_range_are_drawn_clamped_and_shown_so(client, shape_pictures):
    """Where Gradio would refuse them with an "Error" (and blank the views), the controls get the values drawn."""
    client.predict(handle_file(str(shape_pictures["square"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload")
    x, y, routes, heat, message, stage, block = client.predict(9, -3, 1.5, -1, api_name="/route")
    assert (value(x), value(y), value(stage), value(block)) == (1, 0, 1, 0)
    assert message.startswith("Stage 1, layer 0 ") and "query region 7 of the 8x8 grid" in message
    assert pixels(routes).shape == pixels(heat).shape
    x, y, *_, message, stage, block = client.predict(-3, 0, 0.25, 0.75, api_name="/route")
    assert value(stage) == 0 and message.startswith("Stage 0, layer 0 ")
    assert "value" not in x and "value" not in y and "value" not in block, "values in range are not written back"
    *_, message, stage, block = client.predict(None, None, None, None, api_name="/route")   # boxes being retyped
    assert message.startswith("Stage 0, layer 0 ") and "query region 36 of the 8x8 grid" in message


def test_a_layer_the_stage_lacks_is_moved_into_it_and_shown(launched_app, shape_pictures):
    """biformer_tiny (random weights) has 8 attention layers in stage 2 but 2 in stage 0; CrossFormer's LSDA layers
    show the group of the token under the query point."""
    user = Client(launched_app[0], verbose=False)
    user.predict(handle_file(str(shape_pictures["square"])), 2, 7, 0.5, 0.5, api_name="/analyse_upload")
    *_, message, stage, block = user.predict("biformer_tiny", None, 2, 7, 0.5, 0.5, api_name="/load_model")
    assert message.startswith("Stage 2, layer 7 ") and block["maximum"] == 7 and value(block) == 7
    *_, message, stage, block = user.predict(0, 7, 0.5, 0.5, api_name="/route")
    assert message.startswith("Stage 0, layer 1 ") and (block["maximum"], value(block)) == (1, 1)
    assert "value" not in stage
    *_, routes, heat, message, _, _ = user.predict("crossformer_tiny", None, 0, 0, 0.5, 0.5, api_name="/load_model")
    assert "SDA group of the clicked token" in message and heat is None
    assert routes["alt_text"].startswith("The SDA group of the token at the query point")


def test_result_images_describe_what_they_show(client, shape_pictures):
    *_, routes, heat, message, _, _ = client.predict(handle_file(str(shape_pictures["square"])), 0, 0, 0.3, 0.8,
                                                     api_name="/analyse_upload")
    region, routed = re.search(r"query region (\d+) of the 8x8 grid routes to regions ([\d, ]+) ", message).groups()
    assert f"query region {region} of the 8x8 grid in blue" in routes["alt_text"]
    assert f"({routed}, best first)" in routes["alt_text"]
    assert heat["alt_text"].startswith(f"Region affinity of query region {region} to every region")


def test_a_thin_strip_is_analysed(client, tmp_path):
    """2000x20 px: shrinking it to the working size must not take its short side below the 16 px minimum."""
    path = tmp_path / "strip.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (20, 2000, 3), dtype=np.uint8)).save(path)
    *_, routes, heat, message, _, _ = client.predict(handle_file(str(path)), 0, 0, 0.5, 0.5,
                                                     api_name="/analyse_upload")
    assert routes is not None and heat is not None and "routes to regions" in message


def test_the_latest_upload_example_or_click_wins(launched_app, embedded):
    """Events fired while one is computing are queued, not dropped (Gradio's default drops them), and an
    upload clears the example choice while an example clears the upload."""
    import app

    demo = app.build_demo(embedded)
    components = {block._id: block for block in [demo, *demo.blocks.values()]}
    component_events = [dependency for dependency in demo.config["dependencies"]
                        if all(target in components for target, _ in dependency["targets"])]   # not the page's unload
    modes = {}
    for dependency in component_events:
        for target, event in dependency["targets"]:
            modes.setdefault((components[target].get_block_name(), event), set()).add(dependency["trigger_mode"])
    for event in [("file", "upload"), ("dropdown", "input"), ("image", "select"), ("slider", "input"),
                  ("number", "input")]:
        assert "always_last" in modes[event], event
    outputs = {(type(components[dependency["targets"][0][0]]).__name__,
                tuple(type(components[i]).__name__ for i in dependency["outputs"]))
               for dependency in component_events}
    assert ("File", ("Dropdown",)) in outputs and ("Dropdown", ("File",)) in outputs


def test_result_images_offer_only_buttons_that_work_offline(embedded):
    """Gradio's "share" button needs Hugging Face Spaces: offline it only shows an error."""
    import app

    images = [block for block in app.build_demo(embedded).blocks.values() if block.get_block_name() == "image"]
    assert len(images) == 3 and all("share" not in (image.buttons or []) for image in images)


def test_random_weights_are_said(embedded):
    import app
    from bilevel.serving import load_served_model

    served = load_served_model("biformer_tiny")
    assert served.random_weights and not embedded.random_weights
    assert "random weights" in app.describe_model(served).lower()
    assert "random" not in app.describe_model(embedded).lower()


def test_examples_are_served_by_name(client):
    for shape in ("circle", "square", "triangle", "cross"):
        labels, _, _, _, routes, *_ = client.predict(f"shapes: {shape}", 0, 0, 0.5, 0.5, api_name="/analyse_example")
        assert value(labels)["label"] == shape and pixels(routes).size
    labels, *_ = client.predict("photo: astronaut", 0, 0, 0.5, 0.5, api_name="/analyse_example")
    assert len(value(labels)["confidences"]) == 4


def test_one_api_session_gets_every_result_of_concurrent_calls(launched_app, shape_pictures):
    """Only the page's own events (Clear, a new picture) make a running analysis stale: API calls always answer."""
    user = Client(launched_app[0], verbose=False)
    jobs = [user.submit(handle_file(str(shape_pictures["circle"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload"),
            user.submit("shapes: cross", 0, 0, 0.5, 0.5, api_name="/analyse_example"),
            user.submit(handle_file(str(shape_pictures["triangle"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload")]
    results = [job.result(timeout=120) for job in jobs]
    assert [value(labels)["label"] for labels, *_ in results] == ["circle", "cross", "triangle"]
    assert all(pixels(routes).size for _, _, _, _, routes, *_ in results)


def test_bad_uploads_leave_a_message_and_the_app_serving(client, bad_uploads, shape_pictures):
    for kind, path in bad_uploads.items():
        *_, routes, heat, message, _, _ = client.predict(handle_file(str(path)), 0, 0, 0.5, 0.5,
                                                         api_name="/analyse_upload")
        assert message.startswith("**Could not read the upload:**"), kind
        assert routes is None and heat is None
    labels, *_ = client.predict(handle_file(str(shape_pictures["circle"])), 0, 0, 0.5, 0.5,
                                api_name="/analyse_upload")
    assert value(labels)["label"] == "circle"


def test_unsuitable_checkpoint_gets_a_message(client, tmp_path):
    path = tmp_path / "not_weights.pth"
    path.write_bytes(b"definitely not a checkpoint")
    model_info, *_, status, _, _ = client.predict("biformer_tiny", handle_file(str(path)), 0, 0, 0.5, 0.5,
                                                  api_name="/load_model")
    assert status.startswith("**Could not load the model:** the uploaded checkpoint")
    assert "(still serving the previous model)" in status and str(tmp_path) not in status
    assert "Could not" not in model_info, "the model panel keeps describing the model still served"


def test_segmentation_model_shows_its_mask_with_a_legend_and_the_routing(client, shape_pictures):
    from bilevel.serving import EMBEDDED_MODEL, EMBEDDED_SEGMENTATION_MODEL

    client.predict(handle_file(str(shape_pictures["triangle"])), 0, 0, 0.5, 0.5, api_name="/analyse_upload")
    model_info, labels, mask, _, _, routes, heat, message, _, _ = client.predict(
        EMBEDDED_SEGMENTATION_MODEL, None, 0, 0, 0.5, 0.5, api_name="/load_model")
    assert "segmentation: 5 classes" in model_info
    assert labels["label"] == "Classes in the predicted mask (share of the pixels)"
    assert value(labels)["label"] == "background"
    assert "triangle" in {entry["label"] for entry in value(labels)["confidences"]}
    assert mask["visible"] is True and re.fullmatch(r"Predicted mask .*: background \d+%, triangle \d+%.*\.",
                                                    mask["alt_text"])
    overlay = pixels(mask)
    assert overlay.shape[1] == 448 and overlay.shape[0] > 448, "the legend strip lies below the 448 px picture"
    assert pixels(routes).shape[:2] == (448, 448) and "query region" in message
    model_info, labels, mask, *_ = client.predict(EMBEDDED_MODEL, None, 0, 0, 0.5, 0.5, api_name="/load_model")
    assert labels["label"] == "Top-4 predictions", "the embedded classifier knows 4 classes"
    assert value(labels)["label"] == "triangle" and mask["visible"] is False


def test_eight_simultaneous_requests_all_succeed(launched_app, tmp_path):
    url, predictor = launched_app
    uploads = []
    for index in range(8):
        path = tmp_path / f"user{index}.png"
        Image.fromarray(np.random.RandomState(index).randint(0, 255, (70 + index, 90, 3), dtype=np.uint8)).save(path)
        uploads.append(path)
    before = predictor.forward_passes

    def one_user(path):
        return Client(url, verbose=False).predict(handle_file(str(path)), 0, 0, 0.5, 0.5, api_name="/analyse_upload")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_user, uploads))
    assert all(len(value(labels)["confidences"]) == 4 and pixels(routes).size
               for labels, _, _, _, routes, *_ in results)
    assert predictor.forward_passes - before == 8


def test_command_line_defaults_and_a_bad_checkpoint(tmp_path):
    import app

    options = app.parse_args([])
    assert (options.host, options.port, options.model, options.checkpoint) == ("127.0.0.1", 7860, None, None)
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(SystemExit, match=f"app.py: {re.escape(str(path))}"):
        app.main(["--model", "biformer_tiny", "--checkpoint", str(path)])


@pytest.mark.parametrize("option", [["--port", "99999"], ["--port", "0"], ["--port", "http"], ["--concurrency", "0"]])
def test_command_line_refuses_ports_and_concurrency_out_of_range(option, capsys):
    import app

    with pytest.raises(SystemExit) as exited:
        app.parse_args(option)
    assert exited.value.code == 2 and f"argument {option[0]}: " in capsys.readouterr().err


def test_a_busy_port_ends_in_one_line_naming_the_option(embedded, shapes_root, monkeypatch, capsys):
    import app

    monkeypatch.setenv("BILEVEL_CACHE", str(shapes_root.parent))
    monkeypatch.setattr(app, "load_served_model", lambda *args, **kwargs: embedded)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            app.main(["--port", str(port)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"app.py: port {port} on 127.0.0.1 is in use (or 127.0.0.1 is not an address "
                                       f'of this machine): choose another with --port (make demo DEMO_ARGS="--port '
                                       f'{port + 1}")\n')


def test_page_requests_keep_what_the_user_asked_last():
    """A page's analysis is drawn only if its request, recorded when the user acted (not when the queue got to
    it), is still the newest and the page still serves the model it used; API sessions are always answered."""
    import app

    requests = app.PageRequests()
    requests.ask("page", "upload", ("upload", "/tmp/a.png"))
    upload = requests.ticket("page", "upload")
    assert requests.is_current("page", upload, None)
    requests.ask("page", "example", ("example", "shapes: cross"))    # picked while the upload waited or ran
    example = requests.ticket("page", "example")
    assert not requests.is_current("page", upload, None) and requests.is_current("page", example, None)
    assert requests.latest("page") == (example, ("example", "shapes: cross"))
    requests.serve_model("page", "biformer_tiny")
    assert not requests.is_current("page", example, None), "made on the previous model"
    assert requests.is_current("page", example, "biformer_tiny")
    requests.ask("page", "clear", None)
    assert requests.latest("page")[1] is None and not requests.is_current("page", example, "biformer_tiny")
    assert requests.ticket("api", "upload") is None and requests.is_current("api", None, "anything")
    requests.forget("page")
    assert requests.latest("page") == (None, None) and requests.ticket("page", "upload") is None


def test_a_click_gradio_cannot_place_changes_nothing(embedded, shape_pictures):
    """A click on a picture still loading reaches the app without pixel coordinates: the view stays as it is (it
    used to jump to the centre point); a click that is placed picks the region under it."""
    import gradio as gr

    import app
    from bilevel.data.images import read_image
    from bilevel.serving import Predictor, fit_picture

    predictor = Predictor()
    demo = app.build_demo(embedded, predictor)
    clicked = next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "clicked")
    analysis = predictor.analyse(embedded, fit_picture(read_image(next(iter(shape_pictures.values())))))
    unplaced = clicked(analysis, 1, 1, gr.SelectData(None, {"index": None, "value": None}))
    assert len(unplaced) == 7 and all(output == gr.skip() for output in unplaced)
    x, y, routes, *_ = clicked(analysis, 1, 1, gr.SelectData(None, {"index": [0, 0], "value": None}))
    assert x < 0.2 and y < 0.2 and routes is not None
