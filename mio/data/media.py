"""Prepare's media loading: :mod:`mio.media` decodes (the one decoder of every command); here the
recipe's filters apply and every failure becomes a counted SkipSample.

Images come out as upright RGB, speech as mono float32 at the codec's rate (optionally a window
of a long recording: the unit's open recordings are kept in :class:`Recordings`, so a LibriVox
chapter cut into sixty Libriheavy windows is opened once and only its windows are decoded),
videos as a local file path for the video tokenizer.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from mio.data.fields import MediaRef
from mio.data.inputs import SkipSample
from mio.data.recipe import Filters
from mio.media import AudioFile, MediaError, MediaFileMissing, Window, checked_size, read_audio, read_image
from mio.vocab import VIDEO


def _source(ref: MediaRef) -> bytes | Path:
    if ref.data is not None:
        return ref.data
    assert ref.path is not None
    return ref.path


def load_image(ref: MediaRef, filters: Filters, paired: bool) -> PILImage.Image:
    """Decode fully (a truncated file fails here, not in the tokenizer), then the pair filters,
    on the original size when the source recorded one."""
    try:
        rgb = read_image(_source(ref), ref.name)
    except (MediaError, MediaFileMissing) as e:
        raise SkipSample(e.reason, str(e)) from None
    w, h = ref.original_size or rgb.size
    what = f"{w}x{h}" + (" (original size)" if ref.original_size else "")
    if paired and min(w, h) < filters.min_image_side:
        raise SkipSample("image_too_small", f"{ref.name}: {what} is below {filters.min_image_side}px")
    if paired and max(w, h) / max(min(w, h), 1) > filters.max_aspect_ratio:
        raise SkipSample("aspect_ratio", f"{ref.name}: {what} has an aspect ratio over {filters.max_aspect_ratio:g}:1")
    return rgb


def speech_window(ref: MediaRef) -> Window:
    return Window(ref.start or 0.0, ref.duration)


class Recordings:
    """The audio files one unit has open: each file is opened once, and each of its windows is
    read by seeking (only the window's frames are decoded). At most ``max_open`` stay open;
    readers of one file take turns."""

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, tuple[AudioFile | SkipSample, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, ref: MediaRef, sample_rate: int, max_seconds: float | None) -> np.ndarray:
        """(T,) float32 mono of the ref's window; a SkipSample says why not."""
        try:
            if ref.data is not None:  # a tar member: its bytes are at hand
                return read_audio(ref.data, ref.name, sample_rate, speech_window(ref), max_seconds)
            entry, lock = self._entry(ref)
            if isinstance(entry, SkipSample):
                raise entry
            with lock:
                return entry.read(sample_rate, speech_window(ref), max_seconds)
        except (MediaError, MediaFileMissing) as e:
            raise SkipSample(e.reason, str(e)) from None

    def _entry(self, ref: MediaRef) -> tuple[AudioFile | SkipSample, threading.Lock]:
        assert ref.path is not None
        with self._lock:
            if ref.path in self._open:
                self._open.move_to_end(ref.path)
                return self._open[ref.path]
            try:
                entry: AudioFile | SkipSample = AudioFile(ref.path, ref.name)
            except (MediaError, MediaFileMissing) as e:
                entry = SkipSample(e.reason, str(e))  # every window of a bad file is refused alike
            self._open[ref.path] = (entry, threading.Lock())
            while len(self._open) > self.max_open:
                old, old_lock = self._open.popitem(last=False)[1]
                if isinstance(old, AudioFile):
                    with old_lock:
                        old.close()
            return self._open[ref.path]

    def close(self) -> None:
        with self._lock:
            for entry, lock in self._open.values():
                if isinstance(entry, AudioFile):
                    with lock:
                        entry.close()
            self._open.clear()


class VideoFile:
    """A video as a local path for the video tokenizer; tar members go to a temporary file
    that is removed on exit."""

    def __init__(self, ref: MediaRef) -> None:
        self.ref = ref
        self.tmp: str | None = None

    def __enter__(self) -> Path:
        source = _source(self.ref)
        try:
            checked_size(source, VIDEO, self.ref.name)
        except (MediaError, MediaFileMissing) as e:
            raise SkipSample(e.reason, str(e)) from None
        if isinstance(source, Path):
            return source
        suffix = os.path.splitext(self.ref.name)[1] or ".mp4"
        fd, self.tmp = tempfile.mkstemp(suffix=suffix, prefix="mio-video-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.ref.data)
        return Path(self.tmp)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            os.unlink(self.tmp)
