"""The recipe's field language over a row, and a row's values as text or media references.

``fields: {text: a.b.0}`` walks nested JSON (and json members of tar/folder rows);
``{a}/{b}.mp4`` formats from top-level fields; ``x;y`` takes the first present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mio.data.inputs import SkipSample, is_url


def _parse_member_json(value: Any, where: str) -> Any:
    data = value.read_bytes() if isinstance(value, Path) else value
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", f"{where}: json member does not parse ({e})") from None


def _walk(value: Any, parts: list[str], where: str) -> Any:
    for name in parts:
        if isinstance(value, (bytes, Path)):
            value = _parse_member_json(value, where)
        if isinstance(value, dict) and name in value:
            value = value[name]
        elif isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        else:
            return None
    return value


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


def lookup(values: dict[str, Any], spec: str, where: str, required: bool = True) -> Any:
    """A field of a row: ``a.b.0`` walks nested JSON (and json members of tar/folder rows);
    ``{a}/{b}.mp4`` formats from top-level fields; ``x;y`` takes the first present. A required
    field that matches nothing is a ``missing_field`` skip that lists the keys the row has."""
    for alt in spec.split(";"):
        if "{" in alt:
            try:
                return alt.format_map(_Missing(values))
            except (KeyError, IndexError, ValueError):
                continue
        value = values.get(alt) if alt in values else _walk(values, alt.split("."), where)
        if value is not None:
            return value
    if required:
        raise SkipSample("missing_field", f"{where}: row has no field {spec!r}; {_keys_of(values, spec, where)} "
                                          f"(set `fields` in the recipe to the row's names)")
    return None


def _keys_of(values: dict[str, Any], spec: str, where: str) -> str:
    """The keys of the row, or of the deepest object its first alternative's path reaches."""
    first = spec.split(";")[0]
    names = [] if "{" in first else first.split(".")
    path: list[str] = []
    value: Any = values
    for i in range(len(names) - 1, 0, -1):  # the longest prefix that resolves
        found = _walk(values, names[:i], where)
        if found is not None:
            path, value = names[:i], found
            break
    if isinstance(value, (bytes, Path)):
        try:
            value = _parse_member_json(value, where)
        except SkipSample:
            return f"{'.'.join(path)} is not JSON"
    if not isinstance(value, dict):
        return f"{'.'.join(path)} is a {type(value).__name__}, not an object"
    keys = sorted(map(str, value))
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
    return f"{'.'.join(path) + ' has' if path else 'its'} keys: {shown or '(none)'}"


def as_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, Path):
        value = value.read_bytes()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("not_utf8", f"{where}: {name} is not UTF-8 ({e})") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipSample("not_utf8", f"{where}: {name} is not UTF-8") from None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SkipSample("bad_field", f"{where}: {name} must be text, got {type(value).__name__}")


@dataclass
class MediaRef:
    """A media item of a row, not yet loaded: a file, or the bytes of a tar member."""

    kind: str  # image | speech | video
    name: str  # for messages: the file path or "shard.tar:key.ext"
    path: Path | None = None
    data: bytes | None = None
    text: str | None = None  # the paired text (a video tokenizer may choose its key frames by it)
    start: float | None = None  # seconds into the recording (long-form speech, e.g. Libriheavy)
    duration: float | None = None
    original_size: tuple[int, int] | None = None  # (w, h) before a downloader resized it (img2dataset)
    failed: SkipSample | None = None  # a document's media item that cannot be used (dropped or fatal: recipe)


def as_media(value: Any, kind: str, base: Path | None, where: str, name: str) -> MediaRef:
    if isinstance(value, Path):
        return MediaRef(kind, str(value), path=value)
    if isinstance(value, bytes):
        return MediaRef(kind, f"{where}.{name}", data=value)
    if isinstance(value, str) and value:
        if is_url(value):
            raise SkipSample("remote_media", f"{where}: {kind} {value!r} is a URL; mio never downloads media, "
                                              f"fetch it first and point the recipe at the files")
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() or base is None else base / p
        return MediaRef(kind, str(p), path=p)
    raise SkipSample("bad_field", f"{where}: {name} must name a {kind} file, got {type(value).__name__}")


def seconds_field(values: dict[str, Any], spec: str | None, where: str, name: str) -> float | None:
    if spec is None:
        return None
    v = lookup(values, spec, where, required=False)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise SkipSample("bad_field", f"{where}: {name} must be seconds, got {v!r}") from None


def original_size_field(values: dict[str, Any], spec: str, where: str) -> tuple[int, int] | None:
    """``fields.original_size: WIDTH,HEIGHT`` (two field specs, checked by the recipe); None when
    the row lacks them."""
    size = [lookup(values, x.strip(), where, required=False) for x in spec.split(",")]
    if any(v is None for v in size):
        return None
    try:
        w, h = (int(float(v)) for v in size)
    except (TypeError, ValueError):
        raise SkipSample("bad_field", f"{where}: original size {size} is not two numbers") from None
    return (w, h) if w > 0 and h > 0 else None
