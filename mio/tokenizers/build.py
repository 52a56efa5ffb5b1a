"""build_tokenizer: a spec (file or parsed dict) -> the tokenizer its `kind` names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mio.tokenizers.image import ImageTokenizer
from mio.tokenizers.spec import check_kind, load_spec
from mio.tokenizers.speech import SpeechCodec
from mio.tokenizers.video import VideoTokenizer


def build_tokenizer(spec: str | os.PathLike | dict[str, Any]) -> ImageTokenizer | SpeechCodec | VideoTokenizer:
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
    return VideoTokenizer.from_spec(parsed, where, base)
