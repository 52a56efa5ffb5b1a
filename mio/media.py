"""Reading media files: the one decoder behind `mio prepare`, `mio tokenize` and `mio generate`.

- images: fully decoded (a truncated file fails here, naming it), turned upright by their EXIF
  orientation tag (a phone photo stored sideways is tokenized as the viewer shows it), and any
  PIL mode made RGB (palette, alpha, CMYK, 16-bit grey; transparency composited on white);
- audio: mono float32 at the codec's rate (channels averaged, resampled), refused when a WAV's
  data chunk is shorter than its header declares or fewer frames decode than the header
  announces (libsndfile quietly reads what is there: a cut-off download would pass as a
  shorter clip). Windows of a long recording (Libriheavy cuts) are read by seeking: only the
  window's frames are decoded, and an :class:`AudioFile` stays open for all windows of its file.

Every failure is a :class:`MediaError` (a ValueError) or :class:`MediaFileMissing` (a
FileNotFoundError), each with a stable ``reason`` that `mio prepare` counts in its manifest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from mio.userio import MioUserError

# lhotse accepts a cut that ends up to 25 ms past its recording (its own rounding of
# start + duration); such a window is clamped to the recording, not refused.
WINDOW_END_TOLERANCE_S = 0.025

MediaSource = bytes | Path


class MediaError(MioUserError):
    """A media file or member that cannot be used; ``reason`` is the manifest's skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class MediaFileMissing(FileNotFoundError):
    """A media file that does not exist (reason ``missing_file``)."""

    reason = "missing_file"


def checked_size(source: MediaSource, kind: str, name: str) -> int:
    """The size in bytes of a file or member; missing and empty ones are errors naming it."""
    if isinstance(source, Path):
        if not source.is_file():
            raise MediaFileMissing(f"{kind} file {name} does not exist")
        size = source.stat().st_size
    else:
        size = len(source)
    if size == 0:
        raise MediaError("empty_file", f"{kind} file {name} is empty (0 bytes)")
    return size


def media_bytes(source: MediaSource, kind: str, name: str) -> bytes:
    """The bytes of a file or member; missing and empty ones are errors naming it."""
    checked_size(source, kind, name)
    return source.read_bytes() if isinstance(source, Path) else source


# --- images -------------------------------------------------------------------------------
def to_rgb(im: PILImage.Image) -> PILImage.Image:
    """Any PIL mode -> RGB; transparency is composited on white (what a viewer shows)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, not clip
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = PILImage.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_image(source: MediaSource, name: str) -> PILImage.Image:
    """A file or its bytes -> an upright RGB image (EXIF orientation applied)."""
    data = media_bytes(source, "image", name)
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)  # a copy, rotated/mirrored as its tag says
            return to_rgb(upright)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise MediaError("unreadable_image", f"image file {name} cannot be decoded: {e}") from None


# --- audio --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Seconds of a recording: from ``start``, ``duration`` long (None: to the end)."""

    start: float = 0.0
    duration: float | None = None


WHOLE = Window()


def wav_truncation(fh: BinaryIO, size: int) -> str | None:
    """For a RIFF/WAVE stream of ``size`` bytes, how its data chunk falls short of the size its
    header declares (None when it does not, or when it is not a WAV). Streamed WAVs that
    declare an unknown size (0 or 0xFFFFFFFF) are not judged. Reads only chunk headers."""
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            return None
        declared = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            available = size - fh.tell()
            if declared in (0, 0xFFFFFFFF) or available >= declared:
                return None
            return f"its header declares {declared} bytes of samples, the file holds {available}"
        fh.seek(declared + (declared & 1), 1)  # chunks are word-aligned


class AudioFile:
    """An audio file (or a tar member's bytes) opened once; windows are read by seeking, so a
    window of a long recording decodes only its own frames."""

    def __init__(self, source: MediaSource, name: str) -> None:
        self.name = name
        size = checked_size(source, "audio", name)
        if isinstance(source, Path):
            with open(source, "rb") as fh:
                truncated = wav_truncation(fh, size)
        else:
            truncated = wav_truncation(io.BytesIO(source), size)
        if truncated:
            raise MediaError("unreadable_audio", f"audio file {name} is truncated: {truncated}")
        try:  # libsndfile opens a path itself (no Python in its reads)
            self.file = sf.SoundFile(str(source) if isinstance(source, Path) else io.BytesIO(source))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            raise MediaError("unreadable_audio", f"audio file {name} cannot be decoded: {e}") from None

    def __enter__(self) -> "AudioFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def read(self, sample_rate: int, window: Window = WHOLE, max_seconds: float | None = None) -> np.ndarray:
        """A window -> (T,) float32 mono at ``sample_rate``. A window over ``max_seconds`` is
        refused from the header, before anything is decoded."""
        f, name = self.file, self.name
        rate, total = f.samplerate, f.frames
        start = int(round(window.start * rate))
        frames = total - start if window.duration is None else int(round(window.duration * rate))
        late = start + frames - total
        if 0 < late <= WINDOW_END_TOLERANCE_S * rate:
            frames -= late
        if start < 0 or frames < 0 or start + frames > total:
            raise MediaError("bad_field", f"{name}: window start={window.start}s duration={window.duration}s lies "
                                          f"outside the recording ({total / rate:.2f}s)")
        if max_seconds is not None and frames / rate > max_seconds:
            raise MediaError("speech_too_long", f"{name}: {frames / rate:.2f}s is over {max_seconds:g}s")
        try:
            f.seek(start)
            wave = f.read(frames, dtype="float32", always_2d=True)  # (T, C)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise MediaError("unreadable_audio", f"audio file {name} cannot be decoded: {e}") from None
        if wave.shape[0] < frames:
            raise MediaError("unreadable_audio", f"audio file {name} is truncated: its header announces "
                                                 f"{start + frames} frames, it holds {start + wave.shape[0]}")
        if wave.shape[0] == 0:
            raise MediaError("empty_audio", f"audio file {name} is empty (0 samples)")
        mono = wave.mean(axis=1)  # (T,)
        if not np.isfinite(mono).all():
            raise MediaError("unreadable_audio", f"audio file {name} holds NaN or infinite samples")
        if rate != sample_rate:
            import torch
            import torchaudio.functional as AF

            mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sample_rate).numpy()
        return mono.astype(np.float32)


def read_audio(source: MediaSource, name: str, sample_rate: int, window: Window = WHOLE,
               max_seconds: float | None = None) -> np.ndarray:
    """One file (or its bytes), or a window of it -> (T,) float32 mono at ``sample_rate``."""
    with AudioFile(source, name) as f:
        return f.read(sample_rate, window, max_seconds)
