"""Modality tokenizers built from specs: SEED images, SpeechTokenizer speech, video key frames.

    tok = build_tokenizer("tokenizers/tiny/seed.yaml")   # or a parsed dict
    codes = tok.encode(["cat.jpg"])                      # (1, 32) int64

``MediaTokenizers`` is the set of them a command uses (prepare, tokenize, generate).
"""

from __future__ import annotations

from mio.tokenizers.build import build_tokenizer
from mio.tokenizers.image import ImageTokenizer
from mio.tokenizers.media_tokenizers import MediaTokenizers, MissingTokenizerError, SpecSource
from mio.tokenizers.spec import MissingCheckpointError, load_spec
from mio.tokenizers.speech import SpeechCodec
from mio.tokenizers.tokenize import tokenize_cli
from mio.tokenizers.video import VideoTokenizer

__all__ = [
    "ImageTokenizer",
    "MediaTokenizers",
    "MissingCheckpointError",
    "MissingTokenizerError",
    "SpecSource",
    "SpeechCodec",
    "VideoTokenizer",
    "build_tokenizer",
    "load_spec",
    "tokenize_cli",
]
