"""Modality tokenizers built from specs: SEED images, SpeechTokenizer speech, video key frames.

    tok = build_tokenizer("tokenizers/tiny/seed.yaml")   # or a parsed dict
    codes = tok.encode(["cat.jpg"])                      # (1, 32) int64
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mio.tokenizers.image import ImageTokenizer
from mio.tokenizers.speech import SpeechCodec
from mio.tokenizers.spec import MissingCheckpointError, check_kind, load_spec
from mio.tokenizers.tokenize import tokenize_cli

if TYPE_CHECKING:
    from mio.tokenizers.video import VideoTokenizer

__all__ = [
    "ImageTokenizer",
    "MissingCheckpointError",
    "SpeechCodec",
    "VideoTokenizer",
    "build_tokenizer",
    "load_spec",
    "tokenize_cli",
]


def build_tokenizer(spec: str | os.PathLike | dict[str, Any]) -> "ImageTokenizer | SpeechCodec | VideoTokenizer":
    """Build the tokenizer a spec describes; `kind:` selects seed | speechtokenizer | video.

    Relative paths inside a spec (a video spec's `image:` spec) resolve against the spec's folder
    when it is a file, else against the current directory.
    """
    if isinstance(spec, dict):
        where, base, parsed = "<dict>", Path.cwd(), spec
    else:
        where, base, parsed = str(spec), Path(spec).resolve().parent, load_spec(spec)
    kind = check_kind(parsed, where)
    if kind == "seed":
        return ImageTokenizer.from_spec(parsed, where)
    if kind == "speechtokenizer":
        return SpeechCodec.from_spec(parsed, where)
    from mio.tokenizers.video import VideoTokenizer

    return VideoTokenizer.from_spec(parsed, where, base)


def __getattr__(name: str) -> Any:
    if name == "VideoTokenizer":  # imported lazily: it pulls in OpenCV and PySceneDetect
        from mio.tokenizers.video import VideoTokenizer

        return VideoTokenizer
    raise AttributeError(name)
