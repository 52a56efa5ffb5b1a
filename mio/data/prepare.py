"""`mio prepare RECIPE --out DIR`: raw data -> shards of segments + a manifest.

Work is cut into *units*: unit (p, c) is rows ``[c*shard_size, (c+1)*shard_size)`` of input
part p, and it becomes exactly one shard ``{source}-{p:05d}-{c:05d}.tar`` plus a small record
``.units/{same}.json`` (its counts), written after the shard; the record is the commit mark.
Units do not depend on how many ranks run or on what ran before, so:

- ranks split units between them (whole parts when there are at least as many parts as
  ranks, else the units of each part in turn), each writing disjoint shards;
- a rerun skips units whose record exists, and redoes an interrupted one from its start
  (shards are reproducible to the byte), so a killed run loses nothing and duplicates nothing;
  a unit whose input failed (a missing input, a remote shard that broke off) is retried;
- whichever rank finds every unit recorded merges the records into ``manifest.json``;
- one job writes a folder at a time (:mod:`mio.data.lock`); the ranks of a job share it.

Every row read is either written or skipped with a counted reason: samples + skipped = seen.
Media are decoded in a thread pool one batch ahead of the tokenizers, so that the tokenizers
(the expensive part) never wait for files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mio.data.grounding import grounding_draft, part_rows
from mio.data.lock import LOCK, MEMBERS, FolderLock, FolderLocked
from mio.data.media import Recordings, VideoFile, load_image
from mio.data.recipe import Recipe
from mio.data.shards import (MANIFEST, SHARD_FORMAT, AtomicShardWriter, StoredSample, token_counts,
                             write_json_atomic)
from mio.data.sources import (Draft, Item, MediaRef, Part, Row, SkipSample, draft_row, list_parts,
                              media_refs)
from mio.segments import Box, Image, Segment, Speech, Text, Video
from mio.templates import ConversationError, Turn, check_conversation
from mio.tokenizers.media_tokenizers import MediaTokenizers, MissingTokenizerError, SpecSource

UNITS = ".units"
CLEARED = ".mio-prepare.cleared"  # the job whose --overwrite emptied the folder (its ranks clear once)
EXAMPLES_PER_UNIT = 20
EXAMPLES_IN_MANIFEST = 100
PROGRESS_EVERY_S = 30.0
SHARD_NAME = re.compile(r".+-\d{5}-\d{5}\.tar")

Log = Callable[[str], None]


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
def recipe_tokenizers(recipe: Recipe, tokenizer_dir: str | os.PathLike | None, local_rank: int) -> MediaTokenizers:
    """The tokenizers a recipe names (built on first use: a recipe may name more than its rows
    need). With a tokenizer folder, each spec's file name is looked up there (tiny specs for
    tests and the demo). A spec that does not exist stops the run before any row is read."""
    specs = {}
    for kind, spec in recipe.tokenizers.items():
        path = (Path(tokenizer_dir) / Path(spec).name if tokenizer_dir else recipe.resolve(spec)).resolve()
        if not path.is_file():
            origin = (f"--tokenizers {tokenizer_dir}" if tokenizer_dir else
                      f"`tokenizers.{kind}: {spec}`, relative to the recipe's folder")
            raise FileNotFoundError(
                f"recipe {recipe.path}: the {kind} tokenizer spec {path} does not exist (from {origin}); pass "
                f"--tokenizers DIR, a folder that holds {path.name} (tokenizers/tiny holds the tiny specs the demo "
                f"uses), or fix `tokenizers.{kind}` in the recipe")
        specs[kind] = SpecSource(str(path), f"recipe {recipe.path}")
    return MediaTokenizers(specs, local_rank=local_rank, missing_hint=(
        "the recipe names no {kind} tokenizer (add `tokenizers: {{{kind}: SPEC.yaml}}` to the recipe)"))


def tokenizer(ctx: "Context", kind: str, where: str) -> Any:
    try:
        return ctx.tok.get(kind)
    except MissingTokenizerError as e:
        raise MissingTokenizerError(f"{where}: a {kind} segment, but {e}") from None


# --- what a run measures of itself ----------------------------------------------------------
@dataclass
class Meter:
    """Rows per second, time left and how busy the tokenizers are (progress lines; `mio bench
    prepare` reads the same object). ``read`` is the fraction of this rank's input read, parts
    weighted by their size in bytes."""

    log: Log | None = None
    started: float = field(default_factory=time.perf_counter)
    rows: int = 0  # rows of the units this run prepared
    encode_s: float = 0.0  # seconds the media tokenizers were encoding
    first_encode: float | None = None  # when they started (building them and the first batch's decoding come before)
    read: float = 0.0
    read_at_start: float | None = None
    weights: dict[int, float] = field(default_factory=dict)  # part index -> share of the input
    done_weight: float = 0.0
    last_line: float = field(default_factory=time.perf_counter)

    def plan(self, parts: list[Part]) -> None:
        sizes = {p.index: p.size() for p in parts}
        known = [s for s in sizes.values() if s]
        typical = sum(known) / len(known) if known else 1.0
        total = sum(s or typical for s in sizes.values()) or 1.0
        self.weights = {i: (s or typical) / total for i, s in sizes.items()}

    def part_done(self, part: Part) -> None:
        self.done_weight += self.weights.get(part.index, 0.0)
        self.read = self.done_weight

    def row_read(self, part: Part, row: Row) -> None:
        if row.read is not None:
            self.read = self.done_weight + self.weights.get(part.index, 0.0) * min(row.read, 1.0)

    def rows_done(self, n: int) -> None:
        if self.read_at_start is None:
            self.read_at_start = self.read
        self.rows += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def encoded(self, start: float) -> None:
        """One tokenizer call that began at ``start`` has ended."""
        self.first_encode = start if self.first_encode is None else self.first_encode
        self.encode_s += time.perf_counter() - start

    def busy(self) -> float:
        """The fraction of the time since the tokenizers' first call that they were encoding."""
        if self.first_encode is None:
            return 0.0
        return self.encode_s / max(time.perf_counter() - self.first_encode, 1e-9)

    def line(self) -> str:
        s = self.seconds
        parts = [f"{self.rows / max(s, 1e-9):,.1f} rows/s", f"{100 * self.read:.0f}% of the input read"]
        gained = self.read - (self.read_at_start or 0.0)
        if 0 < gained and self.read < 1:
            parts.append(f"~{_duration(s * (1 - self.read) / gained)} left")
        if self.encode_s:
            parts.append(f"tokenizers busy {100 * self.busy():.0f}%")
        return ", ".join(parts)

    def unit_finished(self, name: str, samples: int, skipped: int) -> None:
        if self.log:
            self.log(f"{name}: {samples} samples, {skipped} skipped | {self.line()}")
            self.last_line = time.perf_counter()

    def batch_finished(self, unit: str) -> None:
        if self.log and time.perf_counter() - self.last_line >= PROGRESS_EVERY_S:
            self.log(f"{unit} in progress | {self.line()}")
            self.last_line = time.perf_counter()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# --- one batch of rows -> samples -----------------------------------------------------------
@dataclass
class Context:
    recipe: Recipe
    tok: MediaTokenizers
    pool: ThreadPoolExecutor
    fingerprint: dict[str, Any]
    out: Path
    meter: Meter


def _text_chars(draft: Draft) -> int:
    return sum(len(x.text.strip()) if isinstance(x, Text) else len(x.phrase or "") if isinstance(x, Box) else 0
               for x in draft.all_items())


def _draft(ctx: Context, row: Row) -> Draft:
    grounding = ctx.recipe.data_type == "grounding"
    draft = grounding_draft(ctx.recipe, row.fields(), row) if grounding else draft_row(ctx.recipe, row)
    if ctx.recipe.data_type != "sft" and _text_chars(draft) < ctx.recipe.filters.min_text_chars:
        raise SkipSample("text_too_short", f"{row.where}: {_text_chars(draft)} characters of text, "
                                           f"fewer than {ctx.recipe.filters.min_text_chars}")
    return draft


def _load(ctx: Context, ref: MediaRef, where: str, recordings: Recordings) -> Any:
    """Decode one media item (runs in the thread pool): PIL image, waveform or key frames."""
    recipe = ctx.recipe
    if ref.failed is not None:
        raise ref.failed
    if ref.kind == "image":
        return load_image(ref, recipe.filters, paired=recipe.data_type == "image_text")
    if ref.kind == "speech":
        codec = tokenizer(ctx, "speech", where)
        limits = [x for x in (recipe.filters.max_speech_seconds, codec.max_seconds) if x is not None]
        return recordings.read(ref, codec.sample_rate, min(limits) if limits else None)
    return _key_frames(ctx, ref, where)


def _key_frames(ctx: Context, ref: MediaRef, where: str) -> list[Any]:
    """A video's key frames as images (decoded here in the pool; encoded with the batch)."""
    tok = tokenizer(ctx, "video", where)
    try:
        with VideoFile(ref) as path:
            frames = tok.key_frames(path, ref.text)[1]
    except (ValueError, RuntimeError, OSError) as e:
        raise SkipSample("unreadable_video", f"{ref.name}: video cannot be read ({e})") from None
    if not frames:
        raise SkipSample("unreadable_video", f"{ref.name}: the video tokenizer found no key frames")
    return frames


def _load_group(ctx: Context, refs: list[tuple[MediaRef, str]], recordings: Recordings) -> list[Any]:
    """Several media items in one pool task (the windows of one recording), each loaded or its
    SkipSample."""
    out: list[Any] = []
    for ref, where in refs:
        try:
            out.append(_load(ctx, ref, where, recordings))
        except SkipSample as s:
            out.append(s if ref.failed is not None else SkipSample(s.reason, f"{where}: {s}"))
    return out


@dataclass
class Batch:
    """Rows whose drafts are made and whose media are loading in the pool."""

    rows: list[tuple[int, Row]]
    results: list[Any]  # per row: Draft (until assembled), StoredSample or SkipSample
    loads: list[tuple[list[tuple[int, int]], Future]]  # (row, media) slots -> their pool task
    dropped: list[SkipSample] = field(default_factory=list)  # documents' media items left out, with why


def submit_batch(ctx: Context, rows: list[tuple[int, Row]], recordings: Recordings) -> Batch:
    """Draft the rows (here) and start loading their media (in the pool): one task per media
    item, except that the windows of one recording share a task (one open file, read in turn)."""
    results: list[Any] = []
    for _, row in rows:
        try:
            results.append(_draft(ctx, row))
        except SkipSample as s:
            results.append(s)
    groups: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for i, d in enumerate(results):
        if isinstance(d, Draft):
            for j, ref in enumerate(media_refs(d)):
                same_file = ref.kind == "speech" and ref.path is not None and ref.failed is None
                groups[("recording", ref.path) if same_file else (i, j)].append((i, j))
    loads = []
    for slots in groups.values():
        refs = [(media_refs(results[i])[j], results[i].where) for i, j in slots]
        loads.append((slots, ctx.pool.submit(_load_group, ctx, refs, recordings)))
    return Batch(rows, results, loads)


def complete_batch(ctx: Context, batch: Batch) -> list[StoredSample | SkipSample]:
    """Wait for the batch's media, drop what failed (a document's bad media item, per the
    recipe, or the whole row), tokenize in one call per modality and assemble the samples."""
    results = batch.results
    loaded: dict[int, list[Any]] = {i: [None] * len(media_refs(d)) for i, d in enumerate(results)
                                    if isinstance(d, Draft)}
    for slots, fut in batch.loads:
        for (i, j), value in zip(slots, fut.result()):
            loaded[i][j] = value
    for i in list(loaded):
        try:
            results[i], loaded[i], dropped = _without_failed_media(ctx, results[i], loaded[i])
        except SkipSample as s:
            results[i] = s
            del loaded[i]
            continue
        batch.dropped += dropped
    codes = _encode(ctx, results, loaded)
    for i in loaded:
        try:
            results[i] = _assemble(ctx, results[i], iter(codes[i]))
        except SkipSample as s:
            results[i] = s
    return results


def _without_failed_media(ctx: Context, draft: Draft, values: list[Any]) -> tuple[Draft, list[Any], list[SkipSample]]:
    """The draft and its loaded media without the items that failed, and those failures. A
    document drops such items when the recipe says ``drop_media``; any other row is skipped with
    the first failure's reason."""
    failed = [v for v in values if isinstance(v, SkipSample)]
    if not failed:
        return draft, values, []
    document = ctx.recipe.data_type in ("interleaved", "video_interleaved")
    if not document or ctx.recipe.filters.bad_media_in_document == "drop_document":
        raise failed[0]
    bad = {id(ref) for ref, v in zip(media_refs(draft), values) if isinstance(v, SkipSample)}
    kept = Draft(draft.where, [x for x in draft.items if id(x) not in bad], task=draft.task)
    return kept, [v for v in values if not isinstance(v, SkipSample)], failed


def _encode(ctx: Context, results: list[Any], loaded: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """Per row, its media's codes: one tokenizer call per modality for the whole batch (a
    video's key frames go through the video tokenizer's image tokenizer, all videos at once)."""
    out: dict[int, list[Any]] = {i: [None] * len(m) for i, m in loaded.items()}
    for kind in ("image", "speech", "video"):
        slots = [(i, j) for i, m in loaded.items() for j, ref in enumerate(media_refs(results[i]))
                 if ref.kind == kind]
        if not slots:
            continue
        tok = tokenizer(ctx, kind, results[slots[0][0]].where)
        batch = [loaded[i][j] for i, j in slots]
        start = time.perf_counter()
        if kind == "image":
            coded = list(tok.encode(batch))
        elif kind == "speech":
            coded = tok.encode(batch, names=[results[i].where for i, _ in slots])
        else:
            codes = tok.image.encode([f for frames in batch for f in frames])  # (sum F, 32)
            coded = np.split(codes, np.cumsum([len(frames) for frames in batch])[:-1])
        ctx.meter.encoded(start)
        for (i, j), c in zip(slots, coded):
            out[i][j] = np.asarray(c)
    return out


def _segment(item: Item, codes: Iterator[Any]) -> Segment:
    if isinstance(item, (Text, Box)):
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
                         f"({rec.get('fingerprint')} vs now {ctx.fingerprint}); pass --overwrite to start the "
                         f"folder afresh, or use another --out folder")
    if rec.get("input_stat") != part.stat() and not part.missing:
        raise ValueError(f"{ctx.out}: input {part.name} changed since unit {name} was prepared; pass --overwrite "
                         f"to start the folder afresh, or use another --out folder")
    if rec["shard"] is not None and not (ctx.out / rec["shard"]["shard"]).is_file():
        return None
    return rec


@dataclass
class UnitJob:
    """One unit being prepared: batches of rows in, one shard and one record out. While the
    tokenizers work on one batch, the pool loads the next one's media."""

    ctx: Context
    part: Part
    chunk: int
    pending: list[tuple[int, Row]] = field(default_factory=list)
    in_flight: Batch | None = None
    recordings: Recordings = field(default_factory=Recordings)
    writer: AtomicShardWriter | None = None
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    dropped_media: Counter = field(default_factory=Counter)
    input_failure: dict[str, str] | None = None
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
        """Start loading the pending rows' media, then finish the batch loaded before them."""
        submitted = submit_batch(self.ctx, self.pending, self.recordings) if self.pending else None
        self.pending = []
        if self.in_flight is not None:
            self._write(self.in_flight)
        self.in_flight = submitted

    def _write(self, batch: Batch) -> None:
        results = complete_batch(self.ctx, batch)
        for (index, row), res in zip(batch.rows, results):
            self.seen += 1
            if isinstance(res, SkipSample):
                self._skip(res)
                if row.input_failure:
                    self.input_failure = {"reason": res.reason, "detail": str(res)}
                continue
            res.key = f"{self.ctx.recipe.source}-{self.part.index:05d}-{index:09d}"
            if self.writer is None:
                self.writer = AtomicShardWriter(self.ctx.out / f"{self.name}.tar").__enter__()
            self.writer.write(res)
            segs = res.all_segments()
            self.tokens.update(token_counts(segs))
            self.kinds.update(k for k, t in (("image", Image), ("speech", Speech), ("video", Video))
                              if any(isinstance(s, t) for s in segs))
        for s in batch.dropped:
            self.dropped_media[s.reason] += 1
            self._example(s, "dropped media: ")
        self.ctx.meter.rows_done(len(batch.rows))
        self.ctx.meter.batch_finished(self.name)

    def _skip(self, s: SkipSample) -> None:
        self.skipped[s.reason] += 1
        self._example(s)

    def _example(self, s: SkipSample, prefix: str = "") -> None:
        if len(self.examples) < EXAMPLES_PER_UNIT:
            self.examples.append({"reason": s.reason, "detail": prefix + str(s)})

    def abort(self) -> None:
        for fut in [f for _, f in self.in_flight.loads] if self.in_flight else []:
            fut.cancel()
        self.recordings.close()
        if self.writer is not None:
            self.writer.__exit__(RuntimeError, None, None)

    def finish(self, rows: int, last: bool) -> dict[str, Any]:
        self.flush()
        self.flush()  # the last batch loaded
        self.recordings.close()
        shard = None
        if self.writer is not None:
            writer, self.writer = self.writer, None  # an interrupt from here on has nothing to abort
            writer.__exit__(None, None, None)
            shard = writer.info()
        else:  # a retried unit may have had a shard before
            (self.ctx.out / f"{self.name}.tar").unlink(missing_ok=True)
        samples = shard["samples"] if shard else 0
        rec = {"unit": self.name, "part": self.part.index, "input": self.part.name, "chunk": self.chunk,
               "rows": rows, "last": last, "seen": self.seen, "samples": samples, "skipped": dict(self.skipped),
               "dropped_media": dict(self.dropped_media), "input_failure": self.input_failure,
               "examples": self.examples, "tokens": dict(self.tokens),
               "tokenizers": {k: self.ctx.tok.specs[k].record() for k in sorted(self.kinds & set(self.ctx.tok.specs))},
               "shard": shard, "fingerprint": self.ctx.fingerprint, "input_stat": self.part.stat()}
        if samples + sum(self.skipped.values()) != self.seen:
            raise AssertionError(f"unit {self.name}: {samples} + {sum(self.skipped.values())} != {self.seen}")
        (self.ctx.out / UNITS).mkdir(exist_ok=True)
        write_json_atomic(record_path(self.ctx.out, self.name), rec)
        self.ctx.meter.unit_finished(self.name, samples, self.seen - samples)
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
        for index, row in enumerate(part_rows(part)):
            if index // size != chunk:
                close(last=False)
                chunk, rows_in_chunk = index // size, 0
                mine = unit_owner(part.index, chunk, n_parts, ranks.world) == ranks.rank
                job = UnitJob(ctx, part, chunk) if mine and read_record(ctx, part, chunk) is None else None
            rows_in_chunk += 1
            ctx.meter.row_read(part, row)
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
    ctx.meter.part_done(part)
    return written


def retry_failed_units(ctx: Context, parts: list[Part], ranks: Ranks) -> tuple[int, int]:
    """Forget this rank's units whose input failed in an earlier run (they are redone), and
    count what is left: (units already done, units to retry)."""
    done = retry = 0
    by_index = {p.index: p for p in parts}
    for path in sorted((ctx.out / UNITS).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("fingerprint") != ctx.fingerprint or rec.get("part") not in by_index:
            continue
        mine = unit_owner(rec["part"], rec["chunk"], len(parts), ranks.world) == ranks.rank
        if rec.get("input_failure") and mine:
            path.unlink()
            retry += 1
        elif mine:
            done += 1
    return done, retry


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
    dropped: Counter = Counter()
    tokens: Counter = Counter()
    tokenizers: dict[str, Any] = {}
    examples: list[dict[str, str]] = []
    for r in recs:
        skipped.update(r["skipped"])
        dropped.update(r.get("dropped_media", {}))
        tokens.update(r["tokens"])
        tokenizers.update(r["tokenizers"])
        examples += r["examples"]
    seen, samples = sum(r["seen"] for r in recs), sum(r["samples"] for r in recs)
    recipe = ctx.recipe
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
        "failed_inputs": [{"input": r["input"], "unit": r["unit"], **r["input_failure"]}
                          for r in recs if r.get("input_failure")],
        "seen": seen,
        "samples": samples,
        "skipped": dict(sorted(skipped.items())),
        "dropped_media": dict(sorted(dropped.items())),
        "skipped_examples": examples[:EXAMPLES_IN_MANIFEST],
        "tokens": dict(sorted(tokens.items())),
    }


# --- the folder -----------------------------------------------------------------------------
def _ours(name: str) -> bool:
    """Whether a file name in an --out folder is one prepare writes."""
    return (name in (MANIFEST, UNITS, LOCK, MEMBERS, CLEARED) or name.startswith(f"{LOCK}.")
            or SHARD_NAME.fullmatch(name) is not None or (name.startswith(".") and name.endswith(".tmp")))


def check_folder(out: Path, source: str) -> None:
    """Refuse a folder that holds anything but a mio dataset, or another recipe's shards."""
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name)) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(f"{out} is not empty and holds no mio dataset ({shown}); give --out a new or empty folder")
    other = [p.name for p in out.glob("*.tar") if not p.name.startswith(f"{source}-")]
    if other:
        raise ValueError(f"{out} holds shards of another dataset ({other[0]}, ...); give each recipe its own --out, "
                         f"or pass --overwrite to replace that dataset")


def clear_folder(out: Path) -> None:
    """Remove what prepare wrote in ``out`` (shards, records, manifest, temporary files); the
    lock files stay (the caller holds the lock)."""
    for p in out.iterdir():
        if p.name in (LOCK, MEMBERS) or p.name.startswith(f"{LOCK}.") or not _ours(p.name):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _cleared_by(out: Path) -> str | None:
    return (out / CLEARED).read_text().strip() if (out / CLEARED).is_file() else None


def _wait_for_clear(out: Path, lock: FolderLock) -> None:
    """A rank that joined an --overwrite job waits until the rank holding the lock has emptied
    the folder (it writes the job into CLEARED when done)."""
    while _cleared_by(out) != lock.job:
        if not lock.live_members(lock.job):
            raise FolderLocked(f"{out}: the process of this job that was clearing the folder for --overwrite is gone; "
                               f"run again")
        time.sleep(0.1)


# --- a whole run ----------------------------------------------------------------------------
class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C: what was finished stays; the message says how to resume."""


def prepare(recipe_path: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None, progress: Log | None = None,
            rank: int | None = None, world_size: int | None = None, overwrite: bool = False,
            meter: Meter | None = None) -> dict[str, Any]:
    """Run a recipe into ``out_dir``: this rank's shards, and ``manifest.json`` once every rank's
    units are done. Returns the manifest, or (on a rank that finished before the others) this
    rank's own figures with ``"merged": False``. ``overwrite`` starts the folder afresh."""
    recipe = Recipe.load(recipe_path)
    ranks = resolve_ranks(rank, world_size)
    out = Path(out_dir)
    tok = recipe_tokenizers(recipe, tokenizer_dir, ranks.local_rank)
    parts = list_parts(recipe)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite or any(not _ours(p.name) for p in out.iterdir()):
        check_folder(out, recipe.source)  # --overwrite replaces a dataset, never a folder of other files
    with FolderLock(out, log=progress) as lock:
        if overwrite and _cleared_by(out) != lock.job:
            if lock.owner:
                clear_folder(out)
                (out / CLEARED).write_text(lock.job + "\n")
            else:
                _wait_for_clear(out, lock)
        return _run(recipe, out, tok, parts, ranks, meter or Meter(progress), progress)


def _run(recipe: Recipe, out: Path, tok: MediaTokenizers, parts: list[Part], ranks: Ranks, meter: Meter,
         progress: Log | None) -> dict[str, Any]:
    fingerprint = {"shard_format": SHARD_FORMAT, "recipe": recipe.sha256(), "tokenizers": tok.fingerprint()}
    pool = ThreadPoolExecutor(max_workers=recipe.workers, thread_name_prefix="mio-media")
    ctx = Context(recipe, tok, pool, fingerprint, out, meter)
    written: list[dict[str, Any]] = []
    done, retry = retry_failed_units(ctx, parts, ranks)
    if progress and (done or retry):
        progress(f"{out}: {done} units already done by an earlier run"
                 + (f"; retrying {retry} whose input failed" if retry else "") + "; preparing the rest")
    todo = [part for part in parts
            if ranks.rank in {unit_owner(part.index, c, len(parts), ranks.world) for c in range(ranks.world)}
            and part_records(ctx, part) is None]
    meter.plan(todo)
    try:
        for part in todo:
            written += run_part(ctx, part, len(parts), ranks)
    except KeyboardInterrupt:
        units = len(list((out / UNITS).glob("*.json"))) if (out / UNITS).is_dir() else 0
        raise PrepareInterrupted(f"interrupted: {units} units of {out} are done ({len(written)} in this run) and "
                                 f"kept; run the same command to resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    manifest = merge_records(ctx, parts)
    if manifest is None:
        if progress:
            progress(f"rank {ranks.rank}/{ranks.world}: done; the last rank to finish writes {out / MANIFEST}")
        return {"merged": False, "rank": ranks.rank, "world_size": ranks.world,
                "seen": sum(r["seen"] for r in written), "samples": sum(r["samples"] for r in written),
                "shards": [r["shard"] for r in written if r["shard"] is not None],
                "skipped": dict(sum((Counter(r["skipped"]) for r in written), Counter()))}
    if manifest["samples"] == 0:  # nothing to keep: leave nothing that would block the corrected rerun
        shutil.rmtree(out / UNITS)
        if manifest["seen"] == 0:
            raise ValueError(f"recipe {recipe.path}: the input holds no rows: "
                             f"{', '.join(p.name for p in parts[:5])}{' ...' if len(parts) > 5 else ''}")
        raise ValueError(f"recipe {recipe.path}: no sample survived ({manifest['seen']} rows seen, skipped "
                         f"{manifest['skipped']}); first reasons: {manifest['skipped_examples'][:3]}. Fix the recipe "
                         f"and run again (nothing was kept in {out})")
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
