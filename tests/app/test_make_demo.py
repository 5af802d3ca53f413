"""``make demo``, the README's command: it serves the app with the embedded model on localhost."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_serves_the_app_with_the_embedded_model(tmp_path):
    port = free_port()
    log = (tmp_path / "demo.log").open("w")
    server = subprocess.Popen(["make", "-s", "demo", f"DEMO_ARGS=--port {port}"], cwd=PROJECT_ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, page = time.monotonic() + 180, None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        assert page is not None, f"no app on port {port}:\n{(tmp_path / 'demo.log').read_text()[-3000:]}"
        assert "embedded demo (BiFormer on the built-in shapes)" in page and "Load model" in page
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
