"""A real browser on the launched app: Debian's headless Chromium driven by Playwright (no browser download).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``): the test fails, not skips, without it.
"""
from __future__ import annotations

import contextlib
import io
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from app import START_MESSAGE

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROUTES_IMAGE = "#routes img"
HEAT_IMAGE = "#heat img"
MASK_IMAGE = "#mask img"
CHANGED = "([selector, old]) => document.querySelector(selector)?.src !== old"
LOADED = "selector => document.querySelector(selector)?.complete && document.querySelector(selector).naturalWidth > 0"
VALID_NUMBERS = "() => [...document.querySelectorAll('input[type=number]')].every(box => box.validity.valid)"
UPLOAD_CLEAR = "#upload button[aria-label=Clear]"
NOTHING_IN_PROGRESS = ("() => ![...document.querySelectorAll('[data-testid=status-tracker]')]"
                       ".some(tracker => tracker.innerText.includes('processing'))")
EXAMPLE_EMPTY = "() => document.querySelector('#example input').value === ''"


def fetched_pixels(page, url: str) -> np.ndarray:
    response = page.request.get(url)
    assert response.ok, url
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


@contextlib.contextmanager
def opened_app(url: str, height: int) -> Iterator:
    """A page of the app at ``url`` in Debian's headless Chromium (1400 px wide), closed afterwards."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url)
            yield page
        finally:
            browser.close()


def pick_example(page, name: str) -> None:
    page.locator("#example input").click()
    page.get_by_role("option", name=name, exact=True).click()


def load_model_in_page(page, name: str) -> None:
    """Choose ``name`` in the Model panel and press Load model."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.wait_for_selector("#model-panel", timeout=60_000)
    choice = page.locator("#model-choice input")
    for _ in range(5):          # the panel opens once the page's scripts handle clicks
        page.locator("#model-panel").get_by_text("Model", exact=True).first.click()
        try:
            choice.wait_for(state="visible", timeout=3000)
            break
        except PlaywrightTimeoutError:
            continue
    choice.click()
    page.get_by_role("option", name=name, exact=True).click()
    page.get_by_role("button", name="Load model").click()


def test_upload_then_click_changes_the_overlay(launched_app, shape_pictures, tmp_path):
    url, predictor = launched_app
    with opened_app(url, height=1000) as page:
        page.locator("input[type=file]").first.set_input_files(str(shape_pictures["triangle"]))
        page.wait_for_selector(ROUTES_IMAGE, timeout=60_000)
        page.get_by_text("triangle", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_selector(HEAT_IMAGE, timeout=60_000)
        before_src = {image: page.locator(image).get_attribute("src") for image in (ROUTES_IMAGE, HEAT_IMAGE)}
        passes = predictor.forward_passes
        page.wait_for_function(LOADED, arg=ROUTES_IMAGE, timeout=30_000)
        box = page.locator(ROUTES_IMAGE).bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.85)
        for image, old in before_src.items():
            page.wait_for_function(CHANGED, arg=[image, old], timeout=60_000)
        after_src = {image: page.locator(image).get_attribute("src") for image in (ROUTES_IMAGE, HEAT_IMAGE)}
        for image in after_src:
            page.wait_for_function(LOADED, arg=image)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        changed = {image: (fetched_pixels(page, before_src[image]), fetched_pixels(page, after_src[image]))
                   for image in before_src}
    for image, (before, after) in changed.items():
        assert before.shape == after.shape and not np.array_equal(before, after), image
    assert predictor.forward_passes == passes, "a click must not run the network again"
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_keys_redraw_the_view_values_out_of_range_are_clamped_and_clearing_resets(launched_app, shape_pictures):
    """Arrow keys on the Stage slider and the query-point box redraw (with no new forward pass); a value typed
    out of range is clamped, not refused with "Error"; a click writes values the boxes accept; Clear resets."""
    url, predictor = launched_app
    with opened_app(url, height=1000) as page:
        page.locator("input[type=file]").first.set_input_files(str(shape_pictures["triangle"]))
        page.get_by_text("query region 36 of the 8x8 grid").wait_for(timeout=60_000)
        passes = predictor.forward_passes
        assert "query region 36 of the 8x8 grid in blue" in page.locator(ROUTES_IMAGE).get_attribute("alt")
        page.get_by_role("slider", name="range slider for Stage").press("ArrowRight")
        page.get_by_text("Stage 1, layer 0").wait_for(timeout=30_000)
        # the redrawn picture must be in place before the click: one still loading has no size to locate it on
        page.wait_for_function(NOTHING_IN_PROGRESS, timeout=30_000)
        page.wait_for_function(LOADED, arg=ROUTES_IMAGE, timeout=30_000)
        box = page.locator(ROUTES_IMAGE).bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.85)
        page.get_by_text("query region 55 of the 8x8 grid").wait_for(timeout=30_000)
        point_x = page.get_by_label("Query point x (fraction of the width)")
        assert point_x.input_value() == "0.9" and page.evaluate(VALID_NUMBERS), "a click writes 0.01 steps"
        for _ in range(10):
            point_x.press("ArrowDown")
        page.get_by_text("query region 54 of the 8x8 grid").wait_for(timeout=30_000)
        point_x.fill("1.5")
        point_x.press("Enter")
        page.get_by_text("query region 55 of the 8x8 grid").wait_for(timeout=30_000)
        page.wait_for_function("() => document.querySelector('input[type=number][step=\"0.01\"]').value === '1'")
        assert page.get_by_text("Error", exact=True).count() == 0 and page.locator(HEAT_IMAGE).count() == 1
        assert predictor.forward_passes == passes, "redrawing must not run the network again"
        page.locator(UPLOAD_CLEAR).click()
        page.get_by_text("Upload an image or pick an example.", exact=True).wait_for(timeout=30_000)
        assert page.locator(ROUTES_IMAGE).count() == 0 and page.locator(HEAT_IMAGE).count() == 0
        assert page.get_by_text("triangle", exact=True).count() == 0, "the predictions are gone"


def gated_first_run(predictor, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the predictor's next network run until released: (started, release)."""
    started, release = threading.Event(), threading.Event()
    run = predictor._run

    def gated_run(served, picture):
        if not started.is_set():
            started.set()
            release.wait(60)
        return run(served, picture)

    monkeypatch.setattr(predictor, "_run", gated_run)
    return started, release


def noise_picture(path: Path, seed: int) -> Path:
    """A picture no other test analysed (no cache hit: the network runs)."""
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


def upload_held(page, picture: Path, started: threading.Event) -> None:
    """Upload ``picture`` and wait until its (held) network run has started."""
    page.locator("input[type=file]").first.set_input_files(str(picture))
    assert started.wait(60), "the analysis did not start"


def watch_for_error_badges(page, seconds: float) -> int:
    """The most "Error" badges seen on the page while sampling it for ``seconds``."""
    most, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, page.get_by_text("Error", exact=True).count())
        time.sleep(0.05)
    return most


def finish_gated_run(page, predictor, release: threading.Event) -> None:
    """Release the held network run and wait until it ended and the page shows nothing in progress."""
    passes = predictor.forward_passes
    release.set()
    deadline = time.monotonic() + 60
    while predictor.forward_passes == passes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predictor.forward_passes == passes + 1, "the network run did not end"
    page.wait_for_function(NOTHING_IN_PROGRESS, timeout=30_000)


def test_clearing_while_the_analysis_runs_keeps_the_page_cleared(launched_app, monkeypatch, tmp_path):
    """Clear pressed while the network still runs: its late result is not drawn, and no output shows "Error"."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    url, predictor = launched_app
    started, release = gated_first_run(predictor, monkeypatch)
    with opened_app(url, height=1000) as page:
        upload_held(page, noise_picture(tmp_path / "noise.png", 7), started)
        page.locator(UPLOAD_CLEAR).click()
        page.locator(UPLOAD_CLEAR).wait_for(state="detached", timeout=30_000)
        badges_while_running = watch_for_error_badges(page, 2.0)
        finish_gated_run(page, predictor, release)
        badges_after = watch_for_error_badges(page, 1.0)
        try:
            page.wait_for_selector(ROUTES_IMAGE, timeout=3000)
            drawn = True
        except PlaywrightTimeoutError:
            drawn = False
        assert not drawn, "the analysis drew its routes over the cleared page"
        assert (badges_while_running, badges_after) == (0, 0), "outputs marked Error"
        assert page.get_by_text(START_MESSAGE, exact=True).count() == 1


def test_an_example_picked_while_an_upload_is_analysed_wins(launched_app, monkeypatch, tmp_path):
    """The upload box empties at once, the example is drawn, and the upload's late result does not replace it."""
    url, predictor = launched_app
    started, release = gated_first_run(predictor, monkeypatch)
    with opened_app(url, height=1000) as page:
        upload_held(page, noise_picture(tmp_path / "noise.png", 8), started)
        pick_example(page, "shapes: triangle")
        page.locator(UPLOAD_CLEAR).wait_for(state="detached", timeout=30_000)
        page.get_by_text("triangle", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_selector(ROUTES_IMAGE, timeout=60_000)
        routes = page.locator(ROUTES_IMAGE).get_attribute("src")
        finish_gated_run(page, predictor, release)
        assert watch_for_error_badges(page, 1.0) == 0, "outputs marked Error"
        assert page.locator(ROUTES_IMAGE).get_attribute("src") == routes, "the upload's late result was drawn"
        box = page.locator(ROUTES_IMAGE).bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
        page.get_by_text("query region 0 of the 8x8 grid").wait_for(timeout=30_000)   # the example's analysis kept


def test_an_upload_resent_after_the_box_was_emptied_changes_nothing(launched_app, monkeypatch, tmp_path):
    """Upload A (running), Clear, upload B (Gradio holds it back until A ends), pick an example: when A ends, Gradio
    sends the held upload again with the box's value then (empty), which must leave the example in place."""
    url, predictor = launched_app
    started, release = gated_first_run(predictor, monkeypatch)
    with opened_app(url, height=1000) as page:
        upload_held(page, noise_picture(tmp_path / "a.png", 10), started)
        page.locator(UPLOAD_CLEAR).click()
        page.locator(UPLOAD_CLEAR).wait_for(state="detached", timeout=30_000)
        page.locator("input[type=file]").first.set_input_files(str(noise_picture(tmp_path / "b.png", 11)))
        page.locator(UPLOAD_CLEAR).wait_for(timeout=30_000)
        pick_example(page, "shapes: cross")
        routes = page.wait_for_selector(ROUTES_IMAGE, timeout=60_000).get_attribute("src")
        finish_gated_run(page, predictor, release)
        assert watch_for_error_badges(page, 2.0) == 0, "outputs marked Error"
        page.wait_for_function(NOTHING_IN_PROGRESS, timeout=30_000)
        assert page.locator(ROUTES_IMAGE).get_attribute("src") == routes, "the example was replaced"
        assert page.locator("#example input").input_value() == "shapes: cross"
        assert page.get_by_text("Could not analyse", exact=False).count() == 0


def test_a_model_loaded_while_an_upload_is_analysed_shows_that_upload_on_the_new_model(launched_app, monkeypatch,
                                                                                        tmp_path):
    """The upload's late result from the previous model is not drawn under the new model's name."""
    url, predictor = launched_app
    started, release = gated_first_run(predictor, monkeypatch)
    with opened_app(url, height=1400) as page:
        upload_held(page, noise_picture(tmp_path / "a.png", 12), started)
        load_model_in_page(page, "biformer_tiny")
        page.get_by_text("Top-5 predictions", exact=True).wait_for(timeout=120_000)   # 1000 classes, not the 4 shapes
        page.wait_for_selector(ROUTES_IMAGE, timeout=60_000)
        finish_gated_run(page, predictor, release)
        assert watch_for_error_badges(page, 1.0) == 0, "outputs marked Error"
        assert page.get_by_text("Top-5 predictions", exact=True).count() == 1
        assert page.get_by_text("Top-4 predictions", exact=True).count() == 0, "the previous model's result was drawn"


def test_an_upload_empties_the_example_choice_at_once_and_is_drawn(launched_app, monkeypatch, tmp_path):
    url, predictor = launched_app
    with opened_app(url, height=1000) as page:
        pick_example(page, "shapes: square")
        page.get_by_text("square", exact=True).first.wait_for(timeout=60_000)
        routes = page.wait_for_selector(ROUTES_IMAGE, timeout=60_000).get_attribute("src")
        started, release = gated_first_run(predictor, monkeypatch)
        upload_held(page, noise_picture(tmp_path / "noise.png", 9), started)
        page.wait_for_function(EXAMPLE_EMPTY, timeout=30_000)
        finish_gated_run(page, predictor, release)
        page.wait_for_function(CHANGED, arg=[ROUTES_IMAGE, routes], timeout=30_000)
        assert watch_for_error_badges(page, 1.0) == 0, "outputs marked Error"


def test_choosing_the_segmentation_model_shows_the_mask_with_a_legend(launched_app, shape_pictures, tmp_path):
    from bilevel.serving import EMBEDDED_SEGMENTATION_MODEL

    with opened_app(launched_app[0], height=1400) as page:
        load_model_in_page(page, EMBEDDED_SEGMENTATION_MODEL)
        page.get_by_text("segmentation: 5 classes").wait_for(timeout=60_000)
        for name in ("Upload an image", "Checkpoint (official .pth or bilevel fit .ckpt)"):
            assert page.get_by_role("button", name=name, exact=True).count() == 1, f"no file upload named {name!r}"
        page.locator("input[type=file]").first.set_input_files(str(shape_pictures["cross"]))
        page.wait_for_selector(MASK_IMAGE, timeout=60_000)
        page.wait_for_function(LOADED, arg=MASK_IMAGE)
        page.screenshot(path=str(tmp_path / "segmentation.png"), full_page=True)
        mask = fetched_pixels(page, page.locator(MASK_IMAGE).get_attribute("src"))
        alt = page.locator(MASK_IMAGE).get_attribute("alt")
        page.get_by_text("Classes in the predicted mask (share of the pixels)").wait_for()
    assert mask.shape[1] == 448 and mask.shape[0] > 448, "the mask picture ends in a legend strip"
    assert alt.startswith("Predicted mask") and "background" in alt and "cross" in alt
