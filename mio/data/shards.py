"""Shards of segments: the stored form of a prepared dataset (DESIGN.md, Shards).

A sample is a ``json`` (data type, source, the segment list with media references, token
counts) plus one ``m{i}.npy`` per media array. Text stays a string, so one prepared dataset
serves any backbone and template. Shards are plain tar files (readable by ``tar`` and by any
WebDataset reader) written byte-for-byte reproducibly: fixed member times and owners, so the
same samples give the same file and the same checksum on any machine and any rerun.

Reading never unpickles: only json and npy (integer arrays, ``allow_pickle=False``) are
decoded; anything else in a shard is an error naming shard, key and member.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict

import numpy as np

from mio.data.tars import tar_samples, tar_writer
from mio.segments import Box, BoxError, Image, Segment, Speech, Text, Video
from mio.templates import DATA_TYPES, Turn
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO

MANIFEST = "manifest.json"
SHARD_FORMAT = "mio-segments/1"


class ShardInfo(TypedDict):
    """What a unit record and the manifest say of one finished shard."""

    shard: str  # file name, in the dataset's folder
    samples: int
    bytes: int
    sha256: str


class Manifest(TypedDict):
    """A prepared dataset's ``manifest.json`` (written by :mod:`mio.data.manifest`)."""

    format: str  # SHARD_FORMAT
    data_type: str
    source: str
    recipe: dict[str, Any]  # path, sha256 and the recipe's settings
    tokenizers: dict[str, Any]  # media kind -> the spec it was tokenized with
    shards: list[ShardInfo]
    inputs: list[dict[str, Any]]  # {input, rows} per input part
    failed_inputs: list[dict[str, Any]]  # {input, unit, reason, detail} per unit whose input failed
    seen: int  # rows read; seen == samples + sum(skipped)
    samples: int
    skipped: dict[str, int]  # reason -> rows
    dropped_media: dict[str, int]  # reason -> media items dropped from documents that were kept
    skipped_examples: list[dict[str, str]]  # {reason, detail}
    tokens: dict[str, int]  # code tokens per modality, and text characters


class ShardError(MioUserError):
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

    def all_segments(self) -> list[Segment]:
        return [s for t in self.turns for s in t.content] if self.turns is not None else list(self.segments)


# --- encoding ---------------------------------------------------------------------------
def _media_array(seg: Segment) -> tuple[str, np.ndarray]:
    if isinstance(seg, Image):
        return IMAGE, np.asarray(seg.codes)
    if isinstance(seg, Video):
        return VIDEO, np.asarray(seg.frames)
    return SPEECH, np.asarray(seg.codes)


def _compact(arr: np.ndarray) -> np.ndarray:
    # Codes fit int16 (codebooks <= 32768); store the narrowest exact type.
    return arr.astype(np.int16) if arr.size == 0 or arr.max() < 2**15 else arr.astype(np.int32)


def token_counts(segments: list[Segment]) -> dict[str, int]:
    """Code tokens per modality (block markers excluded; speech counts every stored layer)
    and characters of text (text tokens depend on the backbone, chosen at training time)."""
    counts = {"text_chars": 0, IMAGE: 0, VIDEO: 0, SPEECH: 0}
    for s in segments:
        if isinstance(s, Text):
            counts["text_chars"] += len(s.text)
        elif isinstance(s, Box):
            counts["text_chars"] += len(s.phrase or "")
        elif isinstance(s, Image):
            counts[IMAGE] += int(np.asarray(s.codes).size)
        elif isinstance(s, Video):
            counts[VIDEO] += int(np.asarray(s.frames).size)
        else:
            counts[SPEECH] += int(np.asarray(s.codes).size)
    return counts


def encode_sample(sample: StoredSample) -> dict[str, Any]:
    """A :class:`StoredSample` -> a WebDataset sample dict (``__key__``, ``json``, ``m{i}.npy``)."""
    if sample.data_type not in DATA_TYPES:
        raise ShardError(f"{sample.key}: unknown data type {sample.data_type!r}")
    if "." in sample.key or "/" in sample.key:
        raise ShardError(f"{sample.key}: a sample key may not contain '.' or '/' (WebDataset splits names there)")
    out: dict[str, Any] = {"__key__": sample.key}
    media_index = 0

    def seg_json(seg: Segment) -> dict[str, Any]:
        nonlocal media_index
        if isinstance(seg, Text):
            return {TEXT: seg.text}
        if isinstance(seg, Box):  # normalized coordinates, as given (quantized only when rendered)
            return {"box": list(seg.coords), **({"phrase": seg.phrase} if seg.phrase is not None else {})}
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
    else:
        meta["segments"] = [seg_json(s) for s in sample.segments]
    meta["tokens"] = token_counts(sample.all_segments())
    out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return out


# --- decoding ---------------------------------------------------------------------------
# The header np.save writes: {'descr': '<i2', 'fortran_order': False, 'shape': (4, 126), }
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][iu][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}\s*\Z")
_DTYPES: dict[bytes, np.dtype] = {}


def load_npy(data: bytes, where: str) -> np.ndarray:
    """npy bytes -> int64 array, never unpickling. The common header is parsed directly (fast
    path, a few microseconds); anything else goes through ``np.load(allow_pickle=False)``.
    Only integer arrays are accepted: codes are integers."""
    if data[:6] == b"\x93NUMPY" and data[6:7] == b"\x01" and len(data) >= 10:
        hlen = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.match(data, 10, 10 + hlen)
        if m is not None:
            descr = m.group(1)
            dtype = _DTYPES.get(descr)
            if dtype is None:
                dtype = _DTYPES[descr] = np.dtype(descr.replace(b"|", b"<").decode())
            shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
            body = memoryview(data)[10 + hlen:]
            if len(body) != math.prod(shape) * dtype.itemsize:
                raise ShardError(f"{where}: npy body holds {len(body)} bytes, its header announces "
                                 f"{math.prod(shape) * dtype.itemsize}")
            return np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.int64)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ShardError(f"{where}: not a plain npy array: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise ShardError(f"{where}: media codes must be an integer array, got {getattr(arr, 'dtype', type(arr))}")
    return arr.astype(np.int64)


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
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: json member is not an object")

    def media(name: Any, kind: str, ndim: int) -> np.ndarray:
        if not isinstance(name, str) or name not in raw:
            raise ShardError(f"{where}: json references {name!r}, which the sample lacks")
        arr = load_npy(raw[name], f"{where}.{name}")
        if arr.ndim != ndim:
            raise ShardError(f"{where}.{name}: {kind} codes must have {ndim} dimensions, got shape {arr.shape}")
        return arr

    def seg_from(d: Any) -> Segment:
        if not isinstance(d, dict):
            raise ShardError(f"{where}: segment {d!r} is not an object")
        if TEXT in d:
            if not isinstance(d[TEXT], str):
                raise ShardError(f"{where}: text segment holds {type(d[TEXT]).__name__}, not a string")
            return Text(d[TEXT])
        if IMAGE in d:
            return Image(media(d[IMAGE], IMAGE, 1))
        if VIDEO in d:
            return Video(media(d[VIDEO], VIDEO, 2))
        if SPEECH in d:
            return Speech(media(d[SPEECH], SPEECH, 2))
        if "box" in d:
            try:
                return Box(tuple(d["box"]), d.get("phrase"))
            except (BoxError, ValueError, TypeError) as e:
                raise ShardError(f"{where}: bad box {d['box']!r}: {e}") from None
        raise ShardError(f"{where}: unknown segment {d}")

    data_type = meta.get("data_type")
    if data_type not in DATA_TYPES:
        raise ShardError(f"{where}: unknown data type {data_type!r}")
    try:
        if "turns" in meta:
            turns = [Turn(str(t["role"]), [seg_from(s) for s in t["segments"]]) for t in meta["turns"]]
            return StoredSample(key, data_type, turns=turns, task=meta.get("task"), source=meta.get("source", ""))
        return StoredSample(key, data_type, [seg_from(s) for s in meta["segments"]], source=meta.get("source", ""))
    except (KeyError, TypeError) as e:
        raise ShardError(f"{where}: malformed sample json ({type(e).__name__}: {e})") from None


# --- writing ----------------------------------------------------------------------------
class AtomicShardWriter:
    """Writes one shard (through :func:`mio.data.tars.tar_writer`): members go to ``.NAME.tmp``
    beside it, which is flushed, fsynced and renamed onto ``NAME`` only when the block exits
    cleanly. A reader or a restarted run never sees a half-written shard; an interrupted one
    leaves at most a temporary file, which the next writer of the same shard overwrites."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.count = 0
        self._file: Any = None
        self._tar: Any = None

    def __enter__(self) -> "AtomicShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._tar = tar_writer(self._file)
        return self

    def write(self, sample: StoredSample) -> None:
        assert self._tar is not None, "use AtomicShardWriter as a context manager"
        self._tar.write(encode_sample(sample))
        self.count += 1

    def __exit__(self, exc_type: object, *exc: object) -> None:
        assert self._file is not None and self._tar is not None
        self._tar.close()  # the end-of-archive blocks; the file stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)

    def info(self) -> ShardInfo:
        """What the manifest records of a finished shard."""
        return ShardInfo(shard=self.path.name, samples=self.count, bytes=self.path.stat().st_size,
                         sha256=file_sha256(self.path))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON written to a temporary file, fsynced, then renamed: readers see all or nothing.
    The temporary name is per process: two ranks may write the same manifest at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- reading ----------------------------------------------------------------------------
def list_shards(path: str | os.PathLike) -> list[str]:
    """The shards of a prepared dataset folder (sorted), or of a glob / brace pattern."""
    p = Path(path)
    shards = sorted(str(s) for s in p.glob("*.tar")) if p.is_dir() else sorted(glob.glob(str(p)))
    if not shards:
        raise FileNotFoundError(f"{path}: no .tar shards found (run `mio prepare` first)")
    return shards


def read_manifest(path: str | os.PathLike) -> Manifest:
    m = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder (a prepared dataset is the --out folder of `mio prepare`)")
    if not m.is_file():
        raise FileNotFoundError(f"{m}: prepared dataset has no manifest (is `mio prepare` still running on it?)")
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise MioUserError(f"{m}: manifest is not valid JSON: {e}") from None


def shard_sample_counts(shards: Sequence[str]) -> dict[str, int]:
    """The sample count of each shard that its dataset folder's manifest lists (none without one)."""
    counts: dict[str, int] = {}
    for folder in sorted({Path(s).parent for s in shards}):
        if (folder / MANIFEST).is_file():
            listed = read_manifest(folder).get("shards", [])
            counts.update({str(folder / r["shard"]): int(r["samples"]) for r in listed})
    return counts


def iter_shard(url: str) -> Iterator[StoredSample]:
    """Every sample of one shard, in order (for inspection and tests); a damaged shard raises."""
    for raw in tar_samples([url]):
        yield decode_sample(raw)
