"""`mio prepare RECIPE --out DIR`: raw data -> shards of segments + a manifest.

A recipe (one YAML file under ``data_recipes/``) names its data type, its input, the field
mapping, the filters, the modality tokenizer specs and the shard size. Every row read is
either written or skipped with a counted reason: read + skipped = seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml
from PIL import Image as PILImage, UnidentifiedImageError

from mio.data.shards import MANIFEST, AtomicShardWriter, StoredSample, token_counts
from mio.segments import Image, Segment, Speech, Text, Video
from mio.templates import DATA_TYPES, Turn

MEDIA_KINDS = ("image", "speech", "video")


@dataclass
class Filters:
    """The paper's filters (image-text pairs: aspect ratio <= 2:1, at least 224x224; speech at
    most 15 s) and a minimum text length."""

    min_image_side: int = 224
    max_aspect_ratio: float = 2.0
    max_speech_seconds: float = 15.0
    min_text_chars: int = 1


@dataclass
class Recipe:
    data_type: str
    input: str
    fields: dict[str, str] = field(default_factory=dict)
    tokenizers: dict[str, str] = field(default_factory=dict)
    filters: Filters = field(default_factory=Filters)
    shard_size: int = 1000
    batch_size: int = 16
    source: str = ""
    path: Path = Path(".")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"recipe {p}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        if raw.get("data_type") not in DATA_TYPES:
            raise ValueError(f"recipe {p}: data_type must be one of {DATA_TYPES}, got {raw.get('data_type')!r}")
        filters = Filters(**(raw.pop("filters", None) or {}))
        return cls(**raw, filters=filters, source=raw.get("source") or p.stem, path=p.resolve())

    def resolve(self, relative: str) -> Path:
        return (self.path.parent / relative).resolve()


class SkipSample(Exception):
    """A row that is dropped with a counted reason (``reason`` is the manifest's key)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# --- rows -> segments with media references ------------------------------------------------
@dataclass
class MediaRef:
    kind: str  # image | speech | video
    path: Path
    text: str | None = None  # the paired text (chooses the number of video key frames)


Draft = list  # a list of Text | MediaRef, or of (role, [Text | MediaRef]) for SFT


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise SkipSample("missing_field", f"{where}: row has no field {name!r}")
    return row[name]


def _item(d: dict[str, Any], base: Path, where: str, text: str | None = None) -> Text | MediaRef:
    for kind in MEDIA_KINDS:
        if kind in d:
            return MediaRef(kind, base / str(d[kind]), text)
    if "text" in d:
        return Text(str(d["text"]))
    raise SkipSample("unknown_segment", f"{where}: segment {d} has none of text/image/speech/video")


def draft_row(recipe: Recipe, row: dict[str, Any], where: str) -> tuple[Draft, str | None]:
    """One input row -> its segments with media still as file references."""
    base = recipe.resolve(recipe.input).parent  # media paths are relative to the input file
    f = {"image": "image", "speech": "audio", "video": "video", "text": "text", **recipe.fields}
    dt = recipe.data_type
    if dt == "text":
        return [Text(str(_field(row, f["text"], where)))], None
    if dt in ("image_text", "speech_text", "video_text"):
        kind = {"image_text": "image", "speech_text": "speech", "video_text": "video"}[dt]
        text = str(_field(row, f["text"], where))
        return [MediaRef(kind, base / str(_field(row, f[kind], where)), text), Text(text)], None
    if dt in ("interleaved", "video_interleaved"):
        items = _field(row, f.get("segments", "segments"), where)
        texts = " ".join(str(d.get("text", "")) for d in items)
        return [_item(d, base, where, texts) for d in items], None
    messages = _field(row, f.get("messages", "messages"), where)
    turns = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"text": content}]
        turns.append((str(m.get("role")), [_item(d, base, where) for d in content or []]))
    return turns, row.get(f.get("task", "task"))


# --- media tokenization (batched) -----------------------------------------------------------
class MediaTokenizers:
    """The modality tokenizers a recipe names, built once from their specs."""

    def __init__(self, recipe: Recipe, tokenizer_dir: str | os.PathLike | None) -> None:
        self.paths = {kind: Path(tokenizer_dir) / spec if tokenizer_dir else recipe.resolve(spec)
                      for kind, spec in recipe.tokenizers.items()}
        self.specs: dict[str, dict[str, Any]] = {}
        self.built: dict[str, Any] = {}

    def get(self, kind: str, where: str) -> Any:
        """The tokenizer of a kind, built on first use (a recipe may name more than it uses)."""
        if kind not in self.built:
            from mio.tokenizers import build_tokenizer

            if kind not in self.paths:
                raise ValueError(f"{where}: a {kind} segment, but the recipe names no {kind} tokenizer")
            path = self.paths[kind]
            if not path.is_file():
                raise FileNotFoundError(f"{where}: {kind} tokenizer spec {path} does not exist")
            self.specs[kind] = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            self.built[kind] = build_tokenizer(path)
        return self.built[kind]


def check_image(path: Path, filters: Filters, paired: bool) -> None:
    if not path.is_file():
        raise SkipSample("missing_file", f"{path}: file not found")
    try:
        with PILImage.open(path) as im:
            im.verify()
        with PILImage.open(path) as im:
            w, h = im.size
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise SkipSample("unreadable_image", f"{path}: {e}") from None
    if paired and min(w, h) < filters.min_image_side:
        raise SkipSample("image_too_small", f"{path}: {w}x{h} is below {filters.min_image_side}px")
    if paired and max(w, h) / max(min(w, h), 1) > filters.max_aspect_ratio:
        raise SkipSample("aspect_ratio", f"{path}: aspect ratio {w}x{h} over {filters.max_aspect_ratio}:1")


def tokenize_media(ref: MediaRef, tok: MediaTokenizers, recipe: Recipe, where: str) -> Segment:
    """One media reference -> its code segment, or a counted skip."""
    paired = recipe.data_type == "image_text"
    if not ref.path.is_file():
        raise SkipSample("missing_file", f"{where}: {ref.path} not found")
    if ref.kind == "image":
        check_image(ref.path, recipe.filters, paired)
        return Image(tok.get("image", where).encode([ref.path])[0])
    if ref.kind == "speech":
        codec = tok.get("speech", where)
        try:
            wave = codec.load_audio(ref.path)
        except (ValueError, RuntimeError, OSError) as e:
            raise SkipSample("unreadable_audio", f"{where}: {e}") from None
        seconds = len(wave) / codec.sample_rate
        if seconds > recipe.filters.max_speech_seconds:
            raise SkipSample("speech_too_long", f"{where}: {ref.path} is {seconds:.1f}s > {recipe.filters.max_speech_seconds}s")
        if len(wave) == 0:
            raise SkipSample("empty_audio", f"{where}: {ref.path} has no samples")
        return Speech(codec.encode([wave])[0])
    video = tok.get("video", where)
    try:
        frames = video.encode(ref.path, ref.text)
    except (ValueError, RuntimeError, OSError) as e:
        raise SkipSample("unreadable_video", f"{where}: {e}") from None
    return Video(np.asarray(frames))


def materialize(draft: Draft, task: str | None, recipe: Recipe, tok: MediaTokenizers, key: str) -> StoredSample:
    def seg(x: Text | MediaRef) -> Segment:
        return x if isinstance(x, Text) else tokenize_media(x, tok, recipe, key)

    if recipe.data_type == "sft":
        turns = [Turn(role, [seg(x) for x in content]) for role, content in draft]
        from mio.templates import check_conversation, ConversationError
        try:
            check_conversation(turns)
        except ConversationError as e:
            raise SkipSample("bad_conversation", f"{key}: {e}") from None
        return StoredSample(key, "sft", turns=turns, task=task, source=recipe.source)
    segments = [seg(x) for x in draft]
    texts = [s for s in segments if isinstance(s, Text)]
    if sum(len(t.text.strip()) for t in texts) < recipe.filters.min_text_chars:
        raise SkipSample("text_too_short", f"{key}: text shorter than {recipe.filters.min_text_chars} characters")
    return StoredSample(key, recipe.data_type, segments, source=recipe.source)


# --- input reading --------------------------------------------------------------------------
def read_jsonl(path: Path, skipped: Counter, examples: list[dict[str, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every parseable line; unparseable lines are counted skips."""
    if not path.is_file():
        raise FileNotFoundError(f"recipe input {path} does not exist")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path.name}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as e:
                _skip(skipped, examples, "bad_json_line", f"{where}: {e}")
                continue
            yield where, row


def _skip(skipped: Counter, examples: list[dict[str, str]], reason: str, detail: str) -> None:
    skipped[reason] += 1
    if len(examples) < 100:
        examples.append({"reason": reason, "detail": detail})


def prepare(recipe_path: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a recipe into ``out_dir``: shards of segments and ``manifest.json``."""
    recipe = Recipe.load(recipe_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = MediaTokenizers(recipe, tokenizer_dir)
    skipped: Counter = Counter()
    examples: list[dict[str, str]] = []
    tokens: Counter = Counter()
    seen = written = 0
    with AtomicShardWriter(out, prefix=recipe.source, max_count=recipe.shard_size) as writer:
        for where, row in read_jsonl(recipe.resolve(recipe.input), skipped, examples):
            seen += 1
            key = f"{recipe.source}-{seen - 1:08d}"
            try:
                draft, task = draft_row(recipe, row, where)
                sample = materialize(draft, task, recipe, tok, where)
            except SkipSample as s:
                _skip(skipped, examples, s.reason, str(s))
                continue
            sample.key = key
            writer.write(sample)
            segs = [x for t in sample.turns for x in t.content] if sample.turns is not None else sample.segments
            tokens.update(token_counts(segs))
            written += 1
            if progress and written % 100 == 0:
                progress(f"{recipe.source}: {written} samples written")
        shards = writer.finished
    seen += skipped["bad_json_line"]
    manifest = {
        "recipe": {"path": str(recipe.path), "sha256": hashlib.sha256(recipe.path.read_bytes()).hexdigest(),
                   **{k: v for k, v in asdict(recipe).items() if k != "path"}},
        "tokenizers": tok.specs,
        "data_type": recipe.data_type,
        "shards": shards if shards else [],
        "seen": seen, "samples": written, "skipped": dict(skipped), "skipped_examples": examples,
        "tokens": dict(tokens),
    }
    if written + sum(skipped.values()) != seen:
        raise AssertionError(f"manifest counts do not add up: {written} + {sum(skipped.values())} != {seen}")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
