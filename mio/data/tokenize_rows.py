"""Rows -> stored samples, a batch at a time: each row's draft is made here, its media are decoded
in a thread pool one batch ahead of the tokenizers (so that the tokenizers, the expensive part,
never wait for files), then each modality is tokenized in one call for the whole batch and the
samples are assembled. A row that fails becomes a counted SkipSample."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mio.data.fields import MediaRef
from mio.data.formats import InputRow
from mio.data.inputs import SkipSample
from mio.data.layouts import Item, RowDraft, draft_row, media_refs
from mio.data.media import Recordings, VideoFile, load_image
from mio.data.progress import Meter
from mio.data.recipe import Recipe
from mio.data.shards import StoredSample
from mio.segments import Box, Image, Segment, Speech, Text, Video
from mio.templates import ConversationError, Turn, check_conversation
from mio.tokenizers.media_tokenizers import MediaTokenizers, MissingTokenizerError, SpecSource
from mio.vocab import IMAGE, SPEECH, VIDEO


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


@dataclass
class Context:
    recipe: Recipe
    tok: MediaTokenizers
    pool: ThreadPoolExecutor
    fingerprint: dict[str, Any]
    out: Path
    meter: Meter


def _text_chars(draft: RowDraft) -> int:
    return sum(len(x.text.strip()) if isinstance(x, Text) else len(x.phrase or "") if isinstance(x, Box) else 0
               for x in draft.all_items())


def _draft(ctx: Context, row: InputRow) -> RowDraft:
    draft = draft_row(ctx.recipe, row)
    if ctx.recipe.data_type != "sft" and _text_chars(draft) < ctx.recipe.filters.min_text_chars:
        raise SkipSample("text_too_short", f"{row.where}: {_text_chars(draft)} characters of text, "
                                           f"fewer than {ctx.recipe.filters.min_text_chars}")
    return draft


def _load(ctx: Context, ref: MediaRef, where: str, recordings: Recordings) -> Any:
    """Decode one media item (runs in the thread pool): PIL image, waveform or key frames."""
    recipe = ctx.recipe
    if ref.failed is not None:
        raise ref.failed
    if ref.kind == IMAGE:
        return load_image(ref, recipe.filters, paired=recipe.data_type == "image_text")
    if ref.kind == SPEECH:
        codec = tokenizer(ctx, SPEECH, where)
        limits = [x for x in (recipe.filters.max_speech_seconds, codec.max_seconds) if x is not None]
        return recordings.read(ref, codec.sample_rate, min(limits) if limits else None)
    return _key_frames(ctx, ref, where)


def _key_frames(ctx: Context, ref: MediaRef, where: str) -> list[Any]:
    """A video's key frames as images (decoded here in the pool; encoded with the batch)."""
    tok = tokenizer(ctx, VIDEO, where)
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

    rows: list[tuple[int, InputRow]]
    results: list[Any]  # per row: RowDraft (until assembled), StoredSample or SkipSample
    loads: list[tuple[list[tuple[int, int]], Future]]  # (row, media) slots -> their pool task
    dropped: list[SkipSample] = field(default_factory=list)  # documents' media items left out, with why


def submit_batch(ctx: Context, rows: list[tuple[int, InputRow]], recordings: Recordings) -> Batch:
    """RowDraft the rows (here) and start loading their media (in the pool): one task per media
    item, except that the windows of one recording share a task (one open file, read in turn)."""
    results: list[Any] = []
    for _, row in rows:
        try:
            results.append(_draft(ctx, row))
        except SkipSample as s:
            results.append(s)
    groups: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for i, d in enumerate(results):
        if isinstance(d, RowDraft):
            for j, ref in enumerate(media_refs(d)):
                same_file = ref.kind == SPEECH and ref.path is not None and ref.failed is None
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
                                    if isinstance(d, RowDraft)}
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


def _without_failed_media(ctx: Context, draft: RowDraft,
                          values: list[Any]) -> tuple[RowDraft, list[Any], list[SkipSample]]:
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
    kept = RowDraft(draft.where, [x for x in draft.items if id(x) not in bad], task=draft.task)
    return kept, [v for v in values if not isinstance(v, SkipSample)], failed


def _encode(ctx: Context, results: list[Any], loaded: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """Per row, its media's codes: one tokenizer call per modality for the whole batch (a
    video's key frames go through the video tokenizer's image tokenizer, all videos at once)."""
    out: dict[int, list[Any]] = {i: [None] * len(m) for i, m in loaded.items()}
    for kind in (IMAGE, SPEECH, VIDEO):
        slots = [(i, j) for i, m in loaded.items() for j, ref in enumerate(media_refs(results[i]))
                 if ref.kind == kind]
        if not slots:
            continue
        tok = tokenizer(ctx, kind, results[slots[0][0]].where)
        batch = [loaded[i][j] for i, j in slots]
        start = time.perf_counter()
        if kind == IMAGE:
            coded = list(tok.encode(batch))
        elif kind == SPEECH:
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
    return {IMAGE: Image, SPEECH: Speech, VIDEO: Video}[item.kind](c)


def _assemble(ctx: Context, draft: RowDraft, codes: Iterator[Any]) -> StoredSample:
    if draft.turns is not None:
        turns = [Turn(role, [_segment(x, codes) for x in content]) for role, content in draft.turns]
        try:
            check_conversation(turns)
        except ConversationError as e:
            raise SkipSample("bad_conversation", f"{draft.where}: {e}") from None
        return StoredSample("", "sft", turns=turns, task=draft.task, source=ctx.recipe.source)
    return StoredSample("", ctx.recipe.data_type, [_segment(x, codes) for x in draft.items], source=ctx.recipe.source)
