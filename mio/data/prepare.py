"""`mio prepare RECIPE --out DIR`: raw data -> shards of segments + a manifest.

Work is cut into *units*: unit (p, c) is rows ``[c*shard_size, (c+1)*shard_size)`` of input
part p, and it becomes exactly one shard ``{source}-{p:05d}-{c:05d}.tar`` plus a small record
``.units/{same}.json`` (its counts), written after the shard; the record is the commit mark.
Units do not depend on how many ranks run or on what ran before, so:

- ranks split units between them (whole parts when there are at least as many parts as
  ranks, else the units of each part in turn), each writing disjoint shards;
- a rerun skips units whose record exists, and redoes an interrupted one from its start
  (shards are reproducible to the byte), so a killed run loses nothing and duplicates nothing;
- whichever rank finds every unit recorded merges the records into ``manifest.json``.

Every row read is either written or skipped with a counted reason: samples + skipped = seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mio.data.media import VideoFile, load_image, load_speech
from mio.data.recipe import Recipe
from mio.data.shards import (MANIFEST, SHARD_FORMAT, AtomicShardWriter, StoredSample, token_counts,
                             write_json_atomic)
from mio.data.sources import (Draft, Item, MediaRef, Part, Row, SkipSample, draft_row, iter_rows, list_parts,
                              media_refs)
from mio.segments import Image, Segment, Speech, Text, Video
from mio.templates import ConversationError, Turn, check_conversation

UNITS = ".units"
EXAMPLES_PER_UNIT = 20
EXAMPLES_IN_MANIFEST = 100

Progress = Callable[[str], None]


# --- ranks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def resolve_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """This process's rank: arguments first, then torchrun (RANK/WORLD_SIZE/LOCAL_RANK), then
    SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), else a single rank."""
    env = os.environ
    for r_key, w_key, l_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank is None and world_size is None and r_key in env and w_key in env:
            try:
                rank, world_size = int(env[r_key]), int(env[w_key])
                local = int(env.get(l_key, "0"))
            except ValueError:
                raise ValueError(f"{r_key}={env[r_key]!r} / {w_key}={env[w_key]!r} are not integers") from None
            break
    else:
        local = 0
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return Ranks(rank, world_size, local)


def unit_owner(part: int, chunk: int, n_parts: int, world: int) -> int:
    """Whole parts per rank when there are enough parts, else a part's units in turn."""
    return part % world if n_parts >= world else (part + chunk) % world


# --- tokenizers -----------------------------------------------------------------------------
_BUILT: dict[tuple[str, str], Any] = {}  # (spec path, sha256) -> tokenizer, shared by prepare calls
_BUILD_LOCK = threading.Lock()  # media threads may ask for a tokenizer first


class MediaTokenizers:
    """The modality tokenizers a recipe names, built on first use (a recipe may name more than
    its rows need) and cached per process by spec content."""

    def __init__(self, recipe: Recipe, tokenizer_dir: str | os.PathLike | None, local_rank: int = 0) -> None:
        # With a tokenizer folder, each spec's file name is looked up there (tiny specs for tests).
        self.paths = {kind: (Path(tokenizer_dir) / Path(spec).name if tokenizer_dir else recipe.resolve(spec)).resolve()
                      for kind, spec in recipe.tokenizers.items()}
        self.local_rank = local_rank

    def sha256(self, kind: str) -> str | None:
        p = self.paths[kind]
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    def fingerprint(self) -> dict[str, str | None]:
        return {kind: self.sha256(kind) for kind in sorted(self.paths)}

    def spec(self, kind: str) -> dict[str, Any]:
        return {"path": str(self.paths[kind]), "sha256": self.sha256(kind)}

    def get(self, kind: str, where: str) -> Any:
        if kind not in self.paths:
            raise ValueError(f"{where}: a {kind} segment, but the recipe names no {kind} tokenizer "
                             f"(add `tokenizers: {{{kind}: SPEC.yaml}}`)")
        path, sha = self.paths[kind], self.sha256(kind)
        if sha is None:
            raise FileNotFoundError(f"{where}: {kind} tokenizer spec {path} does not exist")
        with _BUILD_LOCK:
            if (str(path), sha) not in _BUILT:
                from mio.tokenizers import build_tokenizer

                _select_device(self.local_rank)
                _BUILT[(str(path), sha)] = build_tokenizer(path)
            return _BUILT[(str(path), sha)]


# --- one batch of rows -> samples -----------------------------------------------------------
@dataclass
class Context:
    recipe: Recipe
    tok: MediaTokenizers
    pool: ThreadPoolExecutor
    fingerprint: dict[str, Any]
    out: Path
    progress: Progress | None = None


def _text_chars(draft: Draft) -> int:
    return sum(len(x.text.strip()) for x in draft.all_items() if isinstance(x, Text))


def _draft(ctx: Context, row: Row) -> Draft:
    draft = draft_row(ctx.recipe, row)
    if ctx.recipe.data_type != "sft" and _text_chars(draft) < ctx.recipe.filters.min_text_chars:
        raise SkipSample("text_too_short", f"{row.where}: {_text_chars(draft)} characters of text, "
                                           f"fewer than {ctx.recipe.filters.min_text_chars}")
    return draft


def _load(ctx: Context, ref: MediaRef, where: str) -> Any:
    """Decode one media item (runs in the thread pool): PIL image, waveform or video path."""
    recipe = ctx.recipe
    if ref.kind == "image":
        return load_image(ref, recipe.filters, paired=recipe.data_type == "image_text")
    if ref.kind == "speech":
        codec = ctx.tok.get("speech", where)
        limits = [x for x in (recipe.filters.max_speech_seconds, codec.max_seconds) if x is not None]
        return load_speech(ref, codec.sample_rate, min(limits) if limits else None)
    return _key_frames(ctx, ref, where)


def _key_frames(ctx: Context, ref: MediaRef, where: str) -> list[Any]:
    """A video's key frames as images (decoded here in the pool; encoded with the batch)."""
    tok = ctx.tok.get("video", where)
    try:
        with VideoFile(ref) as path:
            frames = tok.key_frames(path, ref.text)[1]
    except (ValueError, RuntimeError, OSError) as e:
        raise SkipSample("unreadable_video", f"{ref.name}: video cannot be read ({e})") from None
    if not frames:
        raise SkipSample("unreadable_video", f"{ref.name}: the video tokenizer found no key frames")
    return frames


def _load_all(ctx: Context, draft: Draft) -> list[Any]:
    return [_load(ctx, ref, draft.where) for ref in media_refs(draft)]


def process_batch(ctx: Context, rows: list[Row]) -> list[StoredSample | SkipSample]:
    """Rows -> samples (keys unset) or skips, in row order. Media are decoded in threads and
    tokenized in one batch per modality."""
    results: list[Any] = []
    for row in rows:
        try:
            results.append(_draft(ctx, row))
        except SkipSample as s:
            results.append(s)
    drafts = [(i, d) for i, d in enumerate(results) if isinstance(d, Draft)]
    loaded: dict[int, list[Any]] = {i: [] for i, d in drafts if not media_refs(d)}
    futures = [(i, d, ctx.pool.submit(_load_all, ctx, d)) for i, d in drafts if i not in loaded]
    for i, d, fut in futures:
        try:
            loaded[i] = fut.result()
        except SkipSample as s:
            results[i] = s
    codes = _encode(ctx, results, loaded)
    for i in loaded:
        try:
            results[i] = _assemble(ctx, results[i], iter(codes[i]))
        except SkipSample as s:
            results[i] = s
    return results


def _encode(ctx: Context, results: list[Any], loaded: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """Per row, its media's codes: one tokenizer call per modality for the whole batch (a
    video's key frames go through the video tokenizer's image tokenizer, all videos at once)."""
    out: dict[int, list[Any]] = {i: [None] * len(m) for i, m in loaded.items()}
    for kind in ("image", "speech", "video"):
        slots = [(i, j) for i, m in loaded.items() for j, ref in enumerate(media_refs(results[i]))
                 if ref.kind == kind]
        if not slots:
            continue
        tok = ctx.tok.get(kind, results[slots[0][0]].where)
        batch = [loaded[i][j] for i, j in slots]
        if kind == "image":
            coded = list(tok.encode(batch))
        elif kind == "speech":
            coded = tok.encode(batch, names=[results[i].where for i, _ in slots])
        else:
            codes = tok.image.encode([f for frames in batch for f in frames])  # (sum F, 32)
            coded = np.split(codes, np.cumsum([len(frames) for frames in batch])[:-1])
        for (i, j), c in zip(slots, coded):
            out[i][j] = np.asarray(c)
    return out


def _segment(item: Item, codes: Iterator[Any]) -> Segment:
    if isinstance(item, Text):
        return item
    c = next(codes)
    return {"image": Image, "speech": Speech, "video": Video}[item.kind](c)


def _assemble(ctx: Context, draft: Draft, codes: Iterator[Any]) -> StoredSample:
    if draft.turns is not None:
        turns = [Turn(role, [_segment(x, codes) for x in content]) for role, content in draft.turns]
        try:
            check_conversation(turns)
        except ConversationError as e:
            raise SkipSample("bad_conversation", f"{draft.where}: {e}") from None
        return StoredSample("", "sft", turns=turns, task=draft.task, source=ctx.recipe.source)
    return StoredSample("", ctx.recipe.data_type, [_segment(x, codes) for x in draft.items], source=ctx.recipe.source)


# --- units ----------------------------------------------------------------------------------
def unit_name(source: str, part: int, chunk: int) -> str:
    return f"{source}-{part:05d}-{chunk:05d}"


def record_path(out: Path, name: str) -> Path:
    return out / UNITS / f"{name}.json"


def read_record(ctx: Context, part: Part, chunk: int) -> dict[str, Any] | None:
    """A unit's record if the unit is finished (same recipe, tokenizers and input), else None."""
    name = unit_name(ctx.recipe.source, part.index, chunk)
    path = record_path(ctx.out, name)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("fingerprint") != ctx.fingerprint:
        raise ValueError(f"{ctx.out}: unit {name} was prepared from a different recipe or tokenizer spec "
                         f"({rec.get('fingerprint')} vs now {ctx.fingerprint}); use a fresh --out folder")
    if rec.get("input_stat") != part.stat():
        raise ValueError(f"{ctx.out}: input {part.name} changed since unit {name} was prepared; "
                         f"use a fresh --out folder")
    if rec["shard"] is not None and not (ctx.out / rec["shard"]["shard"]).is_file():
        return None
    return rec


@dataclass
class UnitJob:
    """One unit being prepared: batches of rows in, one shard and one record out."""

    ctx: Context
    part: Part
    chunk: int
    pending: list[tuple[int, Row]] = field(default_factory=list)
    writer: AtomicShardWriter | None = None
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    tokens: Counter = field(default_factory=Counter)
    kinds: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return unit_name(self.ctx.recipe.source, self.part.index, self.chunk)

    def add(self, index: int, row: Row) -> None:
        self.pending.append((index, row))
        if len(self.pending) >= self.ctx.recipe.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        results = process_batch(self.ctx, [r for _, r in self.pending])
        for (index, row), res in zip(self.pending, results):
            self.seen += 1
            if isinstance(res, SkipSample):
                self.skipped[res.reason] += 1
                if len(self.examples) < EXAMPLES_PER_UNIT:
                    self.examples.append({"reason": res.reason, "detail": str(res)})
                continue
            res.key = f"{self.ctx.recipe.source}-{self.part.index:05d}-{index:09d}"
            if self.writer is None:
                self.writer = AtomicShardWriter(self.ctx.out / f"{self.name}.tar").__enter__()
            self.writer.write(res)
            segs = res.all_segments()
            self.tokens.update(token_counts(segs))
            self.kinds.update(k for k, t in (("image", Image), ("speech", Speech), ("video", Video))
                              if any(isinstance(s, t) for s in segs))
        self.pending = []

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.__exit__(RuntimeError, None, None)

    def finish(self, rows: int, last: bool) -> dict[str, Any]:
        self.flush()
        shard = None
        if self.writer is not None:
            self.writer.__exit__(None, None, None)
            shard = self.writer.info()
        samples = shard["samples"] if shard else 0
        rec = {"unit": self.name, "part": self.part.index, "input": self.part.name, "chunk": self.chunk,
               "rows": rows, "last": last, "seen": self.seen, "samples": samples, "skipped": dict(self.skipped),
               "examples": self.examples, "tokens": dict(self.tokens),
               "tokenizers": {k: self.ctx.tok.spec(k) for k in sorted(self.kinds & set(self.ctx.tok.paths))},
               "shard": shard, "fingerprint": self.ctx.fingerprint, "input_stat": self.part.stat()}
        if samples + sum(self.skipped.values()) != self.seen:
            raise AssertionError(f"unit {self.name}: {samples} + {sum(self.skipped.values())} != {self.seen}")
        (self.ctx.out / UNITS).mkdir(exist_ok=True)
        write_json_atomic(record_path(self.ctx.out, self.name), rec)
        if self.ctx.progress:
            self.ctx.progress(f"{self.name}: {samples} samples, {self.seen - samples} skipped")
        return rec


def part_records(ctx: Context, part: Part) -> list[dict[str, Any]] | None:
    """All unit records of a part if every one of its units is finished, else None."""
    recs: list[dict[str, Any]] = []
    while True:
        rec = read_record(ctx, part, len(recs))
        if rec is None:
            return None
        recs.append(rec)
        if rec["last"]:
            return recs


def run_part(ctx: Context, part: Part, n_parts: int, ranks: Ranks) -> list[dict[str, Any]]:
    """Prepare this rank's unfinished units of one part; returns the records written."""
    size = ctx.recipe.shard_size
    written: list[dict[str, Any]] = []
    job: UnitJob | None = None
    chunk, rows_in_chunk = -1, 0

    def close(last: bool) -> None:
        nonlocal job
        if job is not None:
            written.append(job.finish(rows_in_chunk, last))
            job = None

    try:
        for index, row in enumerate(iter_rows(part)):
            if index // size != chunk:
                close(last=False)
                chunk, rows_in_chunk = index // size, 0
                mine = unit_owner(part.index, chunk, n_parts, ranks.world) == ranks.rank
                job = UnitJob(ctx, part, chunk) if mine and read_record(ctx, part, chunk) is None else None
            rows_in_chunk += 1
            if job is not None:
                job.add(index, row)
        if chunk == -1:  # an empty part: its one unit records 0 rows
            chunk = 0
            mine = unit_owner(part.index, 0, n_parts, ranks.world) == ranks.rank
            job = UnitJob(ctx, part, 0) if mine and read_record(ctx, part, 0) is None else None
        close(last=True)
    except BaseException:
        if job is not None:
            job.abort()
        raise
    return written


# --- manifest -------------------------------------------------------------------------------
def merge_records(ctx: Context, parts: list[Part]) -> dict[str, Any] | None:
    """The manifest, if every unit of every part is recorded (else None: another rank is still
    working, and the last one to finish merges)."""
    per_part = []
    for part in parts:
        recs = part_records(ctx, part)
        if recs is None:
            return None
        per_part.append(recs)
    recs = [r for rs in per_part for r in rs]
    skipped: Counter = Counter()
    tokens: Counter = Counter()
    tokenizers: dict[str, Any] = {}
    examples: list[dict[str, str]] = []
    for r in recs:
        skipped.update(r["skipped"])
        tokens.update(r["tokens"])
        tokenizers.update(r["tokenizers"])
        examples += r["examples"]
    seen, samples = sum(r["seen"] for r in recs), sum(r["samples"] for r in recs)
    recipe = ctx.recipe
    if seen == 0:
        raise ValueError(f"recipe {recipe.path}: the input holds no rows: "
                         f"{', '.join(p.name for p in parts[:5])}{' ...' if len(parts) > 5 else ''}")
    if samples + sum(skipped.values()) != seen:
        raise AssertionError(f"manifest counts do not add up: {samples} + {sum(skipped.values())} != {seen}")
    return {
        "format": SHARD_FORMAT,
        "data_type": recipe.data_type,
        "source": recipe.source,
        "recipe": {"path": str(recipe.path), "sha256": recipe.sha256(), **recipe.describe()},
        "tokenizers": dict(sorted(tokenizers.items())),
        "shards": [r["shard"] for r in recs if r["shard"] is not None],
        "inputs": [{"input": rs[0]["input"], "rows": sum(r["rows"] for r in rs)} for rs in per_part],
        "seen": seen,
        "samples": samples,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples[:EXAMPLES_IN_MANIFEST],
        "tokens": dict(sorted(tokens.items())),
    }


def prepare(recipe_path: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None, progress: Progress | None = None,
            rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
    """Run a recipe into ``out_dir``: this rank's shards, and ``manifest.json`` once every rank's
    units are done. Returns the manifest, or (on a rank that finished before the others) this
    rank's own figures with ``"merged": False``."""
    recipe = Recipe.load(recipe_path)
    ranks = resolve_ranks(rank, world_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.glob("*.tar") if not p.name.startswith(f"{recipe.source}-")]
    if foreign:
        raise ValueError(f"{out} holds shards of another dataset ({foreign[0]}, ...); give each recipe its own --out")
    tok = MediaTokenizers(recipe, tokenizer_dir, ranks.local_rank)
    fingerprint = {"shard_format": SHARD_FORMAT, "recipe": recipe.sha256(), "tokenizers": tok.fingerprint()}
    parts = list_parts(recipe)
    with ThreadPoolExecutor(max_workers=recipe.workers, thread_name_prefix="mio-media") as pool:
        ctx = Context(recipe, tok, pool, fingerprint, out, progress)
        written: list[dict[str, Any]] = []
        for part in parts:
            owners = {unit_owner(part.index, c, len(parts), ranks.world) for c in range(ranks.world)}
            if ranks.rank not in owners or part_records(ctx, part) is not None:
                continue
            written += run_part(ctx, part, len(parts), ranks)
    manifest = merge_records(ctx, parts)
    if manifest is None:
        if progress:
            progress(f"rank {ranks.rank}/{ranks.world}: done; the last rank to finish writes {out / MANIFEST}")
        return {"merged": False, "rank": ranks.rank, "world_size": ranks.world,
                "seen": sum(r["seen"] for r in written), "samples": sum(r["samples"] for r in written),
                "shards": [r["shard"] for r in written if r["shard"] is not None],
                "skipped": dict(sum((Counter(r["skipped"]) for r in written), Counter()))}
    write_json_atomic(out / MANIFEST, manifest)
    if manifest["samples"] == 0:
        raise ValueError(f"recipe {recipe.path}: no sample survived ({manifest['seen']} rows seen, skipped "
                         f"{manifest['skipped']}); first reasons: {manifest['skipped_examples'][:3]}")
    return manifest


def _select_device(local_rank: int) -> None:
    """Media tokenizers with `device: auto` use the current CUDA device: one GPU per local rank."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
