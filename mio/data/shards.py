"""Shards of segments: the stored form of a prepared dataset (DESIGN.md, Shards).

A sample is a ``json`` (data type, source, the segment list with media references, token
counts) plus one ``m{i}.npy`` per media array. Text stays a string, so one prepared dataset
serves any backbone and template. Reading never unpickles: only json and npy (with
``allow_pickle=False``) are decoded; anything else in a shard is an error naming it.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds

from mio.segments import Image, Segment, Speech, Text, Video
from mio.templates import DATA_TYPES, Turn

MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard member that is not a valid mio sample; the message names shard and key."""


@dataclass
class StoredSample:
    """One sample as stored: segments (or chat turns for SFT) and metadata."""

    key: str
    data_type: str
    segments: list[Segment] = field(default_factory=list)
    turns: list[Turn] | None = None
    task: str | None = None
    source: str = ""

    def media_segments(self) -> list[Segment]:
        segs = [s for t in self.turns for s in t.content] if self.turns is not None else self.segments
        return [s for s in segs if not isinstance(s, Text)]


# --- encoding ---------------------------------------------------------------------------
def _media_array(seg: Segment) -> tuple[str, np.ndarray]:
    if isinstance(seg, Image):
        return "image", np.asarray(seg.codes)
    if isinstance(seg, Video):
        return "video", np.asarray(seg.frames)
    return "speech", np.asarray(seg.codes)


def _compact(arr: np.ndarray) -> np.ndarray:
    # Codes fit int16 (codebooks <= 32768); store the narrowest exact type.
    return arr.astype(np.int16) if arr.size == 0 or arr.max() < 2**15 else arr.astype(np.int32)


def token_counts(segments: list[Segment]) -> dict[str, int]:
    """Code tokens per modality (block markers excluded) and characters of text."""
    counts = {"text_chars": 0, "image": 0, "speech": 0}
    for s in segments:
        if isinstance(s, Text):
            counts["text_chars"] += len(s.text)
        elif isinstance(s, (Image, Video)):
            counts["image"] += int(np.asarray(s.codes if isinstance(s, Image) else s.frames).size)
        else:
            counts["speech"] += int(np.asarray(s.codes).size)
    return counts


def encode_sample(sample: StoredSample) -> dict[str, Any]:
    """A :class:`StoredSample` -> a WebDataset sample dict (``__key__``, ``json``, ``m{i}.npy``)."""
    if sample.data_type not in DATA_TYPES:
        raise ShardError(f"{sample.key}: unknown data type {sample.data_type!r}")
    out: dict[str, Any] = {"__key__": sample.key}
    media_index = 0

    def seg_json(seg: Segment) -> dict[str, Any]:
        nonlocal media_index
        if isinstance(seg, Text):
            return {"text": seg.text}
        kind, arr = _media_array(seg)
        name = f"m{media_index}.npy"
        media_index += 1
        buf = io.BytesIO()
        np.save(buf, _compact(arr), allow_pickle=False)
        out[name] = buf.getvalue()
        return {kind: name}

    meta: dict[str, Any] = {"data_type": sample.data_type, "source": sample.source}
    if sample.turns is not None:
        meta["task"] = sample.task
        meta["turns"] = [{"role": t.role, "segments": [seg_json(s) for s in t.content]} for t in sample.turns]
        all_segs = [s for t in sample.turns for s in t.content]
    else:
        meta["segments"] = [seg_json(s) for s in sample.segments]
        all_segs = sample.segments
    meta["tokens"] = token_counts(all_segs)
    out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return out


# --- decoding ---------------------------------------------------------------------------
SAFE_EXTENSIONS = ("json", "npy")


def decode_sample(raw: dict[str, Any]) -> StoredSample:
    """A raw WebDataset sample (bytes per member) -> :class:`StoredSample`, decoding only json
    and npy without pickle. Raises :class:`ShardError` naming the shard and key."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    for name in raw:
        if not name.startswith("__") and name != "json" and not name.endswith(".npy"):
            raise ShardError(f"{where}: member {name!r} is not json or npy; mio never decodes other formats from a shard")
    if "json" not in raw:
        raise ShardError(f"{where}: sample has no json member")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{where}: json member does not parse: {e}") from None

    def media(name: str) -> np.ndarray:
        if name not in raw:
            raise ShardError(f"{where}: json references {name!r}, which the sample lacks")
        try:
            return np.load(io.BytesIO(raw[name]), allow_pickle=False).astype(np.int64)
        except ValueError as e:
            raise ShardError(f"{where}: {name} is not a plain npy array: {e}") from None

    def seg_from(d: dict[str, Any]) -> Segment:
        if "text" in d:
            return Text(d["text"])
        if "image" in d:
            return Image(media(d["image"]))
        if "video" in d:
            return Video(media(d["video"]))
        if "speech" in d:
            return Speech(media(d["speech"]))
        raise ShardError(f"{where}: unknown segment {d}")

    data_type = meta.get("data_type")
    if data_type not in DATA_TYPES:
        raise ShardError(f"{where}: unknown data type {data_type!r}")
    if "turns" in meta:
        turns = [Turn(t["role"], [seg_from(s) for s in t["segments"]]) for t in meta["turns"]]
        return StoredSample(key, data_type, turns=turns, task=meta.get("task"), source=meta.get("source", ""))
    return StoredSample(key, data_type, [seg_from(s) for s in meta["segments"]], source=meta.get("source", ""))


class AtomicShardWriter:
    """Writes ``{prefix}-{index:06d}.tar`` shards of at most ``max_count`` samples; each shard
    is written to a temporary name and renamed when complete, so a reader (or a restarted
    run) never sees a half-written shard."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_count: int = 1000, start_index: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.index = prefix, max_count, start_index
        self.writer: wds.TarWriter | None = None
        self.count = 0
        self.tmp: Path | None = None
        self.finished: list[dict[str, Any]] = []

    def write(self, sample: StoredSample) -> None:
        if self.writer is None:
            self._open()
        assert self.writer is not None
        self.writer.write(encode_sample(sample))
        self.count += 1
        if self.count >= self.max_count:
            self.close()

    def _open(self) -> None:
        self.tmp = self.out_dir / f".{self.prefix}-{self.index:06d}.tar.tmp"
        self.writer = wds.TarWriter(str(self.tmp))
        self.count = 0

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        assert self.tmp is not None
        final = self.out_dir / f"{self.prefix}-{self.index:06d}.tar"
        os.replace(self.tmp, final)
        self.finished.append({"shard": final.name, "samples": self.count})
        self.writer, self.tmp = None, None
        self.index += 1

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_shards(path: str | os.PathLike) -> list[str]:
    """The shards of a prepared dataset folder (sorted), or of a glob / brace pattern."""
    p = Path(path)
    shards = sorted(str(s) for s in p.glob("*.tar")) if p.is_dir() else sorted(glob.glob(str(p)))
    if not shards:
        raise FileNotFoundError(f"{path}: no .tar shards found (run `mio prepare` first)")
    return shards


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    m = Path(path) / MANIFEST
    if not m.is_file():
        raise FileNotFoundError(f"{m}: prepared dataset has no manifest")
    return json.loads(m.read_text())


def iter_shard(url: str) -> Iterator[StoredSample]:
    """Every sample of one shard, in order (for inspection and tests)."""
    for raw in wds.WebDataset(url, shardshuffle=False, empty_check=False):
        yield decode_sample(raw)
