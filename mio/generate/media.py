"""Prompt media files: which modality a file is read as. The tokenizers that turn them into codes
(and codes back into media) are ``mio.tokenizers.MediaTokenizers``; files are decoded by
``mio.media``, as `mio prepare` and `mio tokenize` decode them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, VIDEO

KINDS = (IMAGE, SPEECH, VIDEO)

SUFFIXES = {
    IMAGE: {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"},
    SPEECH: {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif"},
    VIDEO: {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"},
}


@dataclass(frozen=True)
class MediaFile:
    """A prompt file and the modality it is read as."""

    kind: str
    path: Path

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MioUserError(f"{self.path}: unknown media kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def guess(cls, path: str | os.PathLike) -> "MediaFile":
        """The modality from the file name's suffix."""
        p = Path(path)
        for kind, suffixes in SUFFIXES.items():
            if p.suffix.lower() in suffixes:
                return cls(kind, p)
        raise MioUserError(f"{p}: cannot tell from its suffix whether it is an image, audio or video file; "
                         f"pass it as --image, --speech or --video")

    def check(self) -> None:
        """Fail early, naming the file, when it is missing or plainly of another kind."""
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.kind} file {self.path} does not exist")
        suffix = self.path.suffix.lower()
        for other, suffixes in SUFFIXES.items():
            if other != self.kind and suffix in suffixes and not (self.kind == VIDEO and other == IMAGE and suffix == ".gif"):
                raise MioUserError(f"{self.path} was given as {self.kind} but its suffix {suffix!r} says {other}")
