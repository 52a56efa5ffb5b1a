"""Shared pieces of the server tests (no tests here): a tiny model folder as `mio fit` leaves it,
served by ``running`` (mio.serve.app.serve_in_thread: a real uvicorn server on 127.0.0.1 at a free
port, in a thread of the test process)."""

from __future__ import annotations

import base64
import contextlib
import functools
import socket
from pathlib import Path
from typing import Iterator

from test_generate_support import SAMPLES, save_media_model

from mio.generate.generator import Generator
from mio.serve.app import ServeConfig, create_app, serve_in_thread

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
def running(generator: Generator, config: ServeConfig | None = None) -> Iterator[str]:
    with serve_in_thread(create_app(generator, config or ServeConfig())) as url:
        yield url


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
