"""Shared pieces of the server tests (no tests here): a real uvicorn server on 127.0.0.1 at a free
port, in a thread of the test process, over a tiny model folder as `mio fit` leaves it."""

from __future__ import annotations

import base64
import contextlib
import functools
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import uvicorn

from mio.generate.generator import Generator
from mio.serve.app import ServeConfig, create_app

from test_generate_support import SAMPLES, save_media_model

CAT = SAMPLES / "images" / "cat.jpg"
CLIP = SAMPLES / "speech" / "clip01.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def model_folder(root: Path) -> Path:
    """A random model that likes media (so that random answers hold images and speech)."""
    return save_media_model(root / "model", seed=11, image_bias=4.0, speech_bias=4.0)


@contextlib.contextmanager
def running(generator: Generator, config: ServeConfig = ServeConfig()) -> Iterator[str]:
    """The app on a real uvicorn server; yields its base URL; stops it (draining) on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(generator, config), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
