"""`mio tokenize --spec SPEC FILE...`: what a tokenizer makes of a user's media, one record per file."""

from __future__ import annotations

from typing import Any, Iterator

from mio.tokenizers.media_tokenizers import MediaTokenizers


def tokenize_cli(spec: str, files: list[str]) -> Iterator[dict[str, Any]]:
    """Build the spec's tokenizer once, then yield one JSON-ready dict per file.

    A file that cannot be tokenized yields `{"file": ..., "error": ...}` and the others go on.
    """
    media, kind = MediaTokenizers.from_spec(spec)
    media.get(kind)  # a bad spec stops here, before any file
    for name in files:
        try:
            enc = media.encode_file(kind, name)
        except (OSError, ValueError) as err:
            yield {"file": name, "error": str(err)}
            continue
        record: dict[str, Any] = {"file": name, "kind": kind}
        if enc.seconds is not None:
            record.update(seconds=round(enc.seconds, 3), frames=int(enc.codes.shape[1]))  # codes (layers, frames)
        if enc.frame_numbers is not None:
            record["frames"] = enc.frame_numbers
        yield {**record, "codes": enc.codes.tolist()}
