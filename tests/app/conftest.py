"""Shared pieces of the app tests: the embedded model (loaded once), sample uploads, a launched app."""
from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bilevel.data.images import list_images, read_mask
from bilevel.data.shapes import SHAPE_CLASSES, builtin_shapes


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """The built-in dataset, generated once per test session into a private cache."""
    return builtin_shapes(tmp_path_factory.mktemp("bilevel_cache"))


@pytest.fixture(scope="session")
def embedded():
    from bilevel.serving import load_served_model

    return load_served_model()


@pytest.fixture(scope="session")
def shape_pictures(shapes_root) -> dict[str, Path]:
    """Per shape class, the first validation picture showing that shape alone (class name -> file)."""
    masks = shapes_root / "segmentation" / "val" / "masks"
    return {name: next(path for path in list_images(shapes_root / "classification" / "val" / name)
                       if len(np.unique(read_mask(masks / path.name))) == 2) for name in SHAPE_CLASSES}


def write_bytes(folder: Path, name: str, payload: bytes) -> Path:
    path = folder / name
    path.write_bytes(payload)
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def bad_uploads(tmp_path) -> dict[str, Path]:
    """Files the app must refuse with a message: not an image, empty, 1x1, truncated JPEG."""
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 255, (96, 96, 3), dtype=np.uint8))
    jpeg = encoded(photo, "JPEG", quality=90)
    return {
        "not an image": write_bytes(tmp_path, "notes.png", b"these are words, not pixels\n" * 20),
        "empty": write_bytes(tmp_path, "empty.jpg", b""),
        "1x1": write_bytes(tmp_path, "dot.png", encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")),
        "truncated jpeg": write_bytes(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2]),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def launched_app(embedded, shapes_root, monkeypatch_module):
    """The app on a free localhost port (queue with concurrency 2, as ``python app.py`` runs it): (URL, predictor)."""
    import app
    from bilevel.serving import Predictor

    monkeypatch_module.setenv("BILEVEL_CACHE", str(shapes_root.parent))
    predictor = Predictor()
    demo = app.build_demo(embedded, predictor)
    demo.queue(default_concurrency_limit=2, max_size=64)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=app.MAX_FILE_SIZE)
    yield f"http://127.0.0.1:{port}/", predictor
    demo.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch
