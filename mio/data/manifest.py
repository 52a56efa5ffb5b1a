"""A prepared folder's ``manifest.json``: the unit records of every part merged, once all are
written (whichever rank finds every unit recorded merges them)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mio.data.inputs import Part
from mio.data.shards import SHARD_FORMAT, Manifest
from mio.data.tokenize_rows import Context
from mio.data.units import UnitRecord, part_records

EXAMPLES_IN_MANIFEST = 100


def merge_records(ctx: Context, parts: list[Part]) -> Manifest | None:
    """The manifest, if every unit of every part is recorded (else None: another rank is still
    working, and the last one to finish merges)."""
    per_part: list[list[UnitRecord]] = []
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
    return Manifest(
        format=SHARD_FORMAT,
        data_type=recipe.data_type,
        source=recipe.source,
        recipe={"path": str(recipe.path), "sha256": recipe.sha256(), **recipe.describe()},
        tokenizers=dict(sorted(tokenizers.items())),
        shards=[r["shard"] for r in recs if r["shard"] is not None],
        inputs=[{"input": rs[0]["input"], "rows": sum(r["rows"] for r in rs)} for rs in per_part],
        failed_inputs=[{"input": r["input"], "unit": r["unit"], **r["input_failure"]}
                       for r in recs if r["input_failure"]],
        seen=seen,
        samples=samples,
        skipped=dict(sorted(skipped.items())),
        dropped_media=dict(sorted(dropped.items())),
        skipped_examples=examples[:EXAMPLES_IN_MANIFEST],
        tokens=dict(sorted(tokens.items())),
    )
