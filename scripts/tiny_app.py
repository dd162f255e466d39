"""The app on the tiny-random preset in a process of its own, for the scripts that time or load it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def tiny_app(
    port: int, env: dict[str, str] | None = None, start_s: float = 600
) -> Iterator[subprocess.Popen]:
    """``app_flux.py --preset tiny-random`` on 127.0.0.1:``port``, offline, as README starts it;
    entered once it serves its page, stopped (then killed if need be) on the way out."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    server = subprocess.Popen(
        [sys.executable, "app_flux.py", "--preset", "tiny-random", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.perf_counter()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                    break
            if server.poll() is not None or time.perf_counter() - started > start_s:
                raise RuntimeError("the app did not start")
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        if server.poll() is None:
            server.kill()
