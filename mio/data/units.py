"""Units of work: unit (p, c) is rows ``[c*shard_size, (c+1)*shard_size)`` of input part p, and
it becomes exactly one shard ``{source}-{p:05d}-{c:05d}.tar`` plus a small record
``.units/{same}.json`` (its counts), written after the shard; the record is the commit mark. A
rerun skips units whose record exists and redoes an interrupted one from its start (shards are
reproducible to the byte); a unit whose input failed is retried. Every row read is either
written or skipped with a counted reason: samples + skipped = seen."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from mio.data.formats import InputRow, iter_rows
from mio.data.inputs import Part, SkipSample
from mio.data.media import Recordings
from mio.data.ranks import Ranks, unit_owner
from mio.data.shards import AtomicShardWriter, ShardInfo, token_counts, write_json_atomic
from mio.data.tokenize_rows import Batch, Context, complete_batch, submit_batch
from mio.segments import Image, Speech, Video
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, VIDEO

UNITS = ".units"
EXAMPLES_PER_UNIT = 20


class UnitRecord(TypedDict):
    """``.units/NAME.json``: what one finished unit holds and lost, and what it was made from."""

    unit: str  # its name, also its shard's stem
    part: int
    input: str  # the part's name
    chunk: int
    rows: int  # rows of the unit's range the part had
    last: bool  # the part's last unit
    seen: int  # rows read; seen == samples + sum(skipped)
    samples: int
    skipped: dict[str, int]  # reason -> rows
    dropped_media: dict[str, int]  # reason -> media items dropped from documents that were kept
    input_failure: dict[str, str] | None  # {reason, detail} when the input failed (the unit is retried)
    examples: list[dict[str, str]]  # {reason, detail}, the first EXAMPLES_PER_UNIT
    tokens: dict[str, int]  # code tokens per modality, and text characters
    tokenizers: dict[str, Any]  # media kind -> the spec its samples were tokenized with
    shard: ShardInfo | None  # None: no sample survived
    fingerprint: dict[str, Any]  # shard format, recipe and tokenizer hashes: a rerun must match
    input_stat: list[int] | None  # (size, mtime_ns) of a local input file


def unit_name(source: str, part: int, chunk: int) -> str:
    return f"{source}-{part:05d}-{chunk:05d}"


def record_path(out: Path, name: str) -> Path:
    return out / UNITS / f"{name}.json"


def read_record(ctx: Context, part: Part, chunk: int) -> UnitRecord | None:
    """A unit's record if the unit is finished (same recipe, tokenizers and input), else None."""
    name = unit_name(ctx.recipe.source, part.index, chunk)
    path = record_path(ctx.out, name)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("fingerprint") != ctx.fingerprint:
        raise MioUserError(f"{ctx.out}: unit {name} was prepared from a different recipe or tokenizer spec "
                         f"({rec.get('fingerprint')} vs now {ctx.fingerprint}); pass --overwrite to start the "
                         f"folder afresh, or use another --out folder")
    if rec.get("input_stat") != part.stat() and not part.missing:
        raise MioUserError(f"{ctx.out}: input {part.name} changed since unit {name} was prepared; pass --overwrite "
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
    pending: list[tuple[int, InputRow]] = field(default_factory=list)
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

    def add(self, index: int, row: InputRow) -> None:
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
            self.kinds.update(k for k, t in ((IMAGE, Image), (SPEECH, Speech), (VIDEO, Video))
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

    def finish(self, rows: int, last: bool) -> UnitRecord:
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
        rec = UnitRecord(unit=self.name, part=self.part.index, input=self.part.name, chunk=self.chunk, rows=rows,
                         last=last, seen=self.seen, samples=samples, skipped=dict(self.skipped),
                         dropped_media=dict(self.dropped_media), input_failure=self.input_failure,
                         examples=self.examples, tokens=dict(self.tokens),
                         tokenizers={k: self.ctx.tok.specs[k].record()
                                     for k in sorted(self.kinds & set(self.ctx.tok.specs))},
                         shard=shard, fingerprint=self.ctx.fingerprint, input_stat=self.part.stat())
        if samples + sum(self.skipped.values()) != self.seen:
            raise AssertionError(f"unit {self.name}: {samples} + {sum(self.skipped.values())} != {self.seen}")
        (self.ctx.out / UNITS).mkdir(exist_ok=True)
        write_json_atomic(record_path(self.ctx.out, self.name), rec)
        self.ctx.meter.unit_finished(self.name, samples, self.seen - samples)
        return rec


def part_records(ctx: Context, part: Part) -> list[UnitRecord] | None:
    """All unit records of a part if every one of its units is finished, else None."""
    recs: list[UnitRecord] = []
    while True:
        rec = read_record(ctx, part, len(recs))
        if rec is None:
            return None
        recs.append(rec)
        if rec["last"]:
            return recs


def run_part(ctx: Context, part: Part, n_parts: int, ranks: Ranks) -> list[UnitRecord]:
    """Prepare this rank's unfinished units of one part; returns the records written."""
    size = ctx.recipe.shard_size
    written: list[UnitRecord] = []
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
