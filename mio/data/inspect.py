"""`mio inspect DIR`: a prepared dataset's manifest figures and a few samples, rendered."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from mio.data.shards import iter_shard, list_shards, read_manifest
from mio.segments import Image, Segment, Speech, Text, Video


def describe_segment(seg: Segment) -> str:
    if isinstance(seg, Text):
        return json.dumps(seg.text, ensure_ascii=False)
    if isinstance(seg, Image):
        return f"<image: 32 codes {np.asarray(seg.codes)[:4].tolist()}...>"
    if isinstance(seg, Video):
        return f"<video: {len(seg.frames)} frames>"
    codes = np.asarray(seg.codes)
    return f"<speech: {codes.shape[0]} layers x {codes.shape[1]} frames ({codes.shape[1] / 50:.2f}s)>"


def inspect_dataset(path: str | Path, samples: int = 3, backbone: str | Path | None = None) -> str:
    """Manifest figures, then ``samples`` samples as segments (and as the token ids a pretraining
    step would see when ``backbone`` names a model folder)."""
    m = read_manifest(path)
    lines = [f"dataset {path}: {m['data_type']}, {m['samples']} samples of {m['seen']} seen, "
             f"{len(m['shards'])} shards",
             f"tokens: {json.dumps(m['tokens'])}",
             f"skipped: {json.dumps(m['skipped']) if m['skipped'] else 'none'}"]
    renderer = None
    if backbone is not None:
        from transformers import AutoTokenizer

        from mio.data.pipeline import DatasetSpec, Renderer
        from mio.vocab import VocabTable

        tok = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
        renderer = Renderer(tok, VocabTable.load(backbone))
        spec = DatasetSpec(str(path), format="sft" if m["data_type"] == "sft" else "pretrain")
    rng = random.Random(0)
    shown = 0
    for shard in list_shards(path):
        for s in iter_shard(shard):
            if shown >= samples:
                break
            shown += 1
            if s.turns is not None:
                body = " | ".join(f"{t.role}: " + " ".join(describe_segment(x) for x in t.content) for t in s.turns)
            else:
                body = " ".join(describe_segment(x) for x in s.segments)
            lines.append(f"- {s.key}: {body}")
            if renderer is not None:
                ts = renderer(s, spec, rng)
                lines.append(f"  rendered: {len(ts.input_ids)} tokens, {int((ts.labels != -100).sum())} supervised")
    return "\n".join(lines)
