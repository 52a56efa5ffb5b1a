"""What a generation gives back: the answer's ids, segments and settings (:class:`Generation`),
and, once written to a folder, its decoded segments (:class:`Written`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mio.generate.decoding import DecodeResult
from mio.generate.settings import DecodeSettings
from mio.segments import Segment
from mio.templates import Turn
from mio.vocab import TEXT


@dataclass
class PartialBlock:
    """A media block the token limit cut off: reported, never decoded."""

    kind: str  # image or speech
    tokens: int  # codes generated inside the block
    detail: str


@dataclass
class Generation:
    turns: list[Turn]  # the prompt as the user gave it (media as files or codes)
    prompt_ids: np.ndarray  # (P,) the rendered prompt
    result: DecodeResult
    segments: list[Segment]  # the answer's complete segments
    partial: PartialBlock | None
    settings: dict[str, DecodeSettings]
    seed: int
    chat: bool
    preset: str = "paper"

    @property
    def stopped(self) -> str:
        return self.result.stopped


BOX = "box"  # a Decoded box: drawn on the image it points at, not decoded to a file


@dataclass
class Decoded:
    """One answer segment as written: text, or a media file, or why it was not decoded."""

    kind: str  # text, image, speech, video, box (codes: its normalized x1 y1 x2 y2; text: its phrase) or partial
    text: str = ""
    file: str | None = None  # relative to the output folder
    note: str = ""
    codes: list[Any] = field(default_factory=list)



@dataclass
class Written:
    """What :meth:`Generator.write` left: the transcript and the answer's decoded segments."""

    transcript: Path  # transcript.md; the media files lie beside it
    decoded: list[Decoded]

    def answer(self) -> str:
        """The answer as a reader wants it in a terminal: its text, and a line per media file
        (its path) or per segment that was not decoded (why)."""
        parts = []
        for d in self.decoded:
            if d.kind == TEXT:
                parts.append(d.text)
            elif d.file is not None:
                parts.append(f"\n[{d.kind}: {self.transcript.parent / d.file}{' (' + d.note + ')' if d.note else ''}]\n")
            else:
                parts.append(f"\n[{d.kind}: {d.note}]\n")
        return "".join(parts).strip()
