"""`mio prepare RECIPE --out DIR`: raw data -> shards of segments + a manifest.

A run, in the order its parts act:

- :mod:`mio.data.inputs` lists the recipe's input parts, :mod:`mio.data.formats` reads each
  part's rows and :mod:`mio.data.layouts` turns a row into a draft by the reader of its layout;
- :mod:`mio.data.ranks` says which rank prepares which unit (rows ``[c*shard_size,
  (c+1)*shard_size)`` of part p; :mod:`mio.data.units`): a unit becomes one shard and one record,
  so ranks write disjoint shards and a rerun skips what is recorded;
- :mod:`mio.data.tokenize_rows` turns a batch of rows into samples (media decoded in a thread
  pool one batch ahead of the tokenizers), :mod:`mio.data.progress` measures it;
- whichever rank finds every unit recorded merges the records into ``manifest.json``
  (:mod:`mio.data.manifest`);
- one job writes a folder at a time (:mod:`mio.data.lock`, :mod:`mio.data.out_folder`).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypedDict

from mio.data.inputs import Part, list_parts
from mio.data.lock import FolderLock
from mio.data.manifest import merge_records
from mio.data.out_folder import CLEARED, check_folder, clear_folder, cleared_by, ours, wait_for_clear
from mio.data.progress import Log, Meter
from mio.data.ranks import Ranks, resolve_ranks, unit_owner
from mio.data.recipe import Recipe
from mio.data.shards import MANIFEST, SHARD_FORMAT, Manifest, ShardInfo, write_json_atomic
from mio.data.tokenize_rows import Context, recipe_tokenizers
from mio.data.units import UNITS, UnitRecord, part_records, retry_failed_units, run_part
from mio.tokenizers.media_tokenizers import MediaTokenizers
from mio.userio import MioUserError


class RankSummary(TypedDict):
    """What a rank that finished before the others prepared (the last one writes the manifest)."""

    merged: Literal[False]
    rank: int
    world_size: int
    seen: int
    samples: int
    shards: list[ShardInfo]
    skipped: dict[str, int]


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C: what was finished stays; the message says how to resume."""


def prepare(recipe_path: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None, progress: Log | None = None,
            rank: int | None = None, world_size: int | None = None, overwrite: bool = False,
            meter: Meter | None = None) -> Manifest | RankSummary:
    """Run a recipe into ``out_dir``: this rank's shards, and ``manifest.json`` once every rank's
    units are done. Returns the manifest, or (on a rank that finished before the others) this
    rank's own figures with ``"merged": False``. ``overwrite`` starts the folder afresh."""
    recipe = Recipe.load(recipe_path)
    ranks = resolve_ranks(rank, world_size)
    out = Path(out_dir)
    tok = recipe_tokenizers(recipe, tokenizer_dir, ranks.local_rank)
    parts = list_parts(recipe)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite or any(not ours(p.name) for p in out.iterdir()):
        check_folder(out, recipe.source)  # --overwrite replaces a dataset, never a folder of other files
    with FolderLock(out, log=progress) as lock:
        if overwrite and cleared_by(out) != lock.job:
            if lock.owner:
                clear_folder(out)
                (out / CLEARED).write_text(lock.job + "\n")
            else:
                wait_for_clear(out, lock)
        return _run(recipe, out, tok, parts, ranks, meter or Meter(progress), progress)


def _run(recipe: Recipe, out: Path, tok: MediaTokenizers, parts: list[Part], ranks: Ranks, meter: Meter,
         progress: Log | None) -> Manifest | RankSummary:
    fingerprint = {"shard_format": SHARD_FORMAT, "recipe": recipe.sha256(), "tokenizers": tok.fingerprint()}
    pool = ThreadPoolExecutor(max_workers=recipe.workers, thread_name_prefix="mio-media")
    ctx = Context(recipe, tok, pool, fingerprint, out, meter)
    written: list[UnitRecord] = []
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
        return RankSummary(merged=False, rank=ranks.rank, world_size=ranks.world,
                           seen=sum(r["seen"] for r in written), samples=sum(r["samples"] for r in written),
                           shards=[r["shard"] for r in written if r["shard"] is not None],
                           skipped=dict(sum((Counter(r["skipped"]) for r in written), Counter())))
    if manifest["samples"] == 0:  # nothing to keep: leave nothing that would block the corrected rerun
        shutil.rmtree(out / UNITS)
        if manifest["seen"] == 0:
            raise MioUserError(f"recipe {recipe.path}: the input holds no rows: "
                             f"{', '.join(p.name for p in parts[:5])}{' ...' if len(parts) > 5 else ''}")
        raise MioUserError(f"recipe {recipe.path}: no sample survived ({manifest['seen']} rows seen, skipped "
                         f"{manifest['skipped']}); first reasons: {manifest['skipped_examples'][:3]}. Fix the recipe "
                         f"and run again (nothing was kept in {out})")
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
