"""Loading and checking media before tokenization; every failure is a counted SkipSample.

Images come out as RGB (palette, alpha, CMYK and 16-bit images converted; transparency
composited on white), speech as mono float32 at the codec's rate (channels averaged, resampled,
optionally a window of a long recording), videos as a local file path for the video tokenizer.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image as PILImage, UnidentifiedImageError

from mio.data.recipe import Filters
from mio.data.sources import MediaRef, SkipSample


def read_bytes(ref: MediaRef) -> bytes:
    if ref.data is not None:
        data = ref.data
    else:
        assert ref.path is not None
        if not ref.path.is_file():
            raise SkipSample("missing_file", f"{ref.name}: {ref.kind} file not found")
        data = ref.path.read_bytes()
    if not data:
        raise SkipSample("empty_file", f"{ref.name}: {ref.kind} file is empty (0 bytes)")
    return data


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


def load_image(ref: MediaRef, filters: Filters, paired: bool) -> PILImage.Image:
    """Decode fully (a truncated file fails here, not in the tokenizer), then the pair filters."""
    data = read_bytes(ref)
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise SkipSample("unreadable_image", f"{ref.name}: image cannot be decoded ({e})") from None
    w, h = rgb.size
    if paired and min(w, h) < filters.min_image_side:
        raise SkipSample("image_too_small", f"{ref.name}: {w}x{h} is below {filters.min_image_side}px")
    if paired and max(w, h) / max(min(w, h), 1) > filters.max_aspect_ratio:
        raise SkipSample("aspect_ratio", f"{ref.name}: {w}x{h} has an aspect ratio over {filters.max_aspect_ratio:g}:1")
    return rgb


def load_speech(ref: MediaRef, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """(T,) float32 mono at ``sample_rate``; a clip over ``max_seconds`` is refused from its
    header before it is decoded."""
    data = read_bytes(ref)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, total = f.samplerate, f.frames
            start = int(round((ref.start or 0.0) * rate))
            frames = total - start if ref.duration is None else int(round(ref.duration * rate))
            if start < 0 or start + frames > total or frames < 0:
                raise SkipSample("bad_field", f"{ref.name}: window start={ref.start}s duration={ref.duration}s lies "
                                              f"outside the recording ({total / rate:.2f}s)")
            seconds = frames / rate
            if max_seconds is not None and seconds > max_seconds:
                raise SkipSample("speech_too_long", f"{ref.name}: {seconds:.2f}s is over {max_seconds:g}s")
            f.seek(start)
            wave = f.read(frames, dtype="float32", always_2d=True)  # (T, C)
    except SkipSample:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise SkipSample("unreadable_audio", f"{ref.name}: audio cannot be decoded ({e})") from None
    if wave.shape[0] < frames:
        raise SkipSample("unreadable_audio", f"{ref.name}: audio is truncated: its header announces "
                                             f"{frames} frames, it holds {wave.shape[0]}")
    if wave.shape[0] == 0:
        raise SkipSample("empty_audio", f"{ref.name}: audio has no samples")
    mono = wave.mean(axis=1)  # (T,)
    if not np.isfinite(mono).all():
        raise SkipSample("unreadable_audio", f"{ref.name}: audio holds NaN or infinite samples")
    if rate != sample_rate:
        import torch
        import torchaudio.functional as AF

        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sample_rate).numpy()
    return mono.astype(np.float32)


class VideoFile:
    """A video as a local path for the video tokenizer; tar members go to a temporary file
    that is removed on exit."""

    def __init__(self, ref: MediaRef) -> None:
        self.ref = ref
        self.tmp: str | None = None

    def __enter__(self) -> Path:
        if self.ref.data is None:
            assert self.ref.path is not None
            if not self.ref.path.is_file():
                raise SkipSample("missing_file", f"{self.ref.name}: video file not found")
            if self.ref.path.stat().st_size == 0:
                raise SkipSample("empty_file", f"{self.ref.name}: video file is empty (0 bytes)")
            return self.ref.path
        if not self.ref.data:
            raise SkipSample("empty_file", f"{self.ref.name}: video member is empty (0 bytes)")
        suffix = os.path.splitext(self.ref.name)[1] or ".mp4"
        fd, self.tmp = tempfile.mkstemp(suffix=suffix, prefix="mio-video-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.ref.data)
        return Path(self.tmp)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            os.unlink(self.tmp)
