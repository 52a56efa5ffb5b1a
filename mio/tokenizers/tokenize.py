"""`mio tokenize --spec SPEC FILE...`: what a tokenizer makes of a user's media, one record per file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mio.tokenizers.image import ImageTokenizer
from mio.tokenizers.speech import SpeechCodec


def tokenize_cli(spec: str, files: list[str]) -> Iterator[dict[str, Any]]:
    """Build the spec's tokenizer once, then yield one JSON-ready dict per file.

    A file that cannot be tokenized yields `{"file": ..., "error": ...}` and the others go on.
    """
    from mio.tokenizers import build_tokenizer

    tok = build_tokenizer(spec)
    for name in files:
        try:
            yield {"file": name, **_tokenize_one(tok, Path(name))}
        except (OSError, ValueError) as err:
            yield {"file": name, "error": str(err)}


def _tokenize_one(tok: Any, path: Path) -> dict[str, Any]:
    if isinstance(tok, ImageTokenizer):
        return {"kind": "image", "codes": tok.encode([path])[0].tolist()}
    if isinstance(tok, SpeechCodec):
        wave = tok.load_audio(path)
        codes = tok.encode([wave], names=[f"audio file {path}"])[0]
        return {
            "kind": "speech",
            "seconds": round(wave.shape[0] / tok.sample_rate, 3),
            "frames": int(codes.shape[1]),
            "codes": codes.tolist(),  # (num_layers, frames): layer 0 = content
        }
    frames, images = tok.key_frames(path, None)
    return {"kind": "video", "frames": frames, "codes": tok.image.encode(images).tolist()}
