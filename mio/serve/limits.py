"""What one request may ask of the server, and the checks of the media it carries.

A request's media arrive as base64 inside JSON (``data:`` URLs, ``input_audio``) or as a
multipart file. Each is checked here before anything is queued: its header first (image
pixels, audio seconds: a decompression bomb or an hour of audio is refused before it is
decoded), then a full decode through :mod:`mio.media`, the decoder every other command uses.
The server never opens a path or a URL a request names: only ``data:`` URLs are accepted.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import soundfile as sf
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from mio.media import AudioFile, MediaError, read_image


@dataclass(frozen=True)
class ServeLimits:
    """The server's limits (``mio serve --max-...`` flags)."""

    max_body_bytes: int = 32 * 1024 * 1024  # a request body; larger ones get 413
    max_image_pixels: int = 4096 * 4096  # width x height of an image in a request, read from its header
    max_audio_seconds: float = 60.0  # an audio clip in a request, read from its header
    max_n: int = 4  # choices (or images) one request may ask for
    max_queue: int = 64  # requests waiting or decoding; past it, 503 with Retry-After
    retry_after_s: int = 2  # the Retry-After a 503 suggests

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_n", "max_queue", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_audio_seconds <= 0:
            raise ValueError(f"--max-audio-seconds must be positive, got {self.max_audio_seconds}")


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)",
                      re.DOTALL)


def b64decode(text: str, param: str) -> bytes:
    """Strict base64 (whitespace allowed) -> bytes; anything else is a 400 naming ``param``."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{param} is not valid base64", param, "invalid_base64") from None


def data_url_bytes(url: str, param: str) -> bytes:
    """A ``data:...;base64,...`` URL -> its bytes. Paths, ``file:``, ``http:`` and every other
    scheme are refused: the server never opens what a request names."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] + ":" if re.match(r"^[A-Za-z][\w+.-]*:", url) else "a path"
        raise RequestError(400, f"{param}: only data: URLs (base64) are accepted, got {scheme}; the server never opens "
                                "files or URLs named by a request", param, "unsupported_url")
    m = DATA_URL.fullmatch(url)
    if m is None or not m.group("b64"):
        raise RequestError(400, f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param,
                           "invalid_data_url")
    return b64decode(m.group("data"), param)


def check_image(data: bytes, limits: ServeLimits, param: str) -> None:
    """The image's pixels from its header (no decoding), then a full decode."""
    if not data:
        raise RequestError(400, f"{param}: the image is empty", param, "invalid_image")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise RequestError(400, f"{param}: the image cannot be decoded: {e}", param, "invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"{param}: the image has {width}x{height} pixels, over the server's limit of "
                                f"{limits.max_image_pixels} (--max-image-pixels)", param, "image_too_large")
    try:
        read_image(data, param)
    except MediaError as e:
        raise RequestError(400, str(e), param, "invalid_image") from None


def check_wav(data: bytes, limits: ServeLimits, param: str) -> float:
    """A WAV's length from its header, then a full decode -> its seconds."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RequestError(400, f"{param}: the audio must be a WAV file (RIFF/WAVE)", param, "invalid_audio")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise RequestError(400, f"{param}: the WAV cannot be decoded: {e}", param, "invalid_audio") from None
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > limits.max_audio_seconds:
        raise RequestError(413, f"{param}: the audio lasts {seconds:.1f} s, over the server's limit of "
                                f"{limits.max_audio_seconds:g} s (--max-audio-seconds)", param, "audio_too_long")
    try:
        with AudioFile(data, param) as f:
            f.read(info.samplerate)
    except MediaError as e:
        raise RequestError(400, str(e), param, "invalid_audio") from None
    return seconds
