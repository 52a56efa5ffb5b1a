"""`mio inspect DIR`: a prepared dataset's manifest figures and a few samples, as stored and as a
training step renders them (templates, directions drawn with a fixed seed)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from mio.data.shards import file_sha256, iter_shard, list_shards, read_manifest
from mio.segments import Box, Image, Segment, Text, Video
from mio.vocab import IGNORE_INDEX


def describe_segment(seg: Segment, max_chars: int = 160) -> str:
    if isinstance(seg, Text):
        text = seg.text if len(seg.text) <= max_chars else seg.text[:max_chars] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(seg, Image):
        return f"<image: {np.asarray(seg.codes).size} codes {np.asarray(seg.codes)[:4].tolist()}...>"
    if isinstance(seg, Video):
        return f"<video: {len(seg.frames)} key frames>"
    if isinstance(seg, Box):
        phrase = f"{json.dumps(seg.phrase, ensure_ascii=False)} " if seg.phrase is not None else ""
        return f"<box {phrase}" + " ".join(f"{v:.3f}" for v in seg.coords) + ">"
    codes = np.asarray(seg.codes)
    return f"<speech: {codes.shape[0]} layer(s) x {codes.shape[1]} frames ({codes.shape[1] / 50:.2f}s)>"


def describe_segments(segs: list[Segment]) -> str:
    return " ".join(describe_segment(s) for s in segs)


def manifest_lines(m: dict[str, Any]) -> list[str]:
    total_bytes = sum(s.get("bytes", 0) for s in m["shards"])
    lines = [f"{m['data_type']} from {m.get('source', '?')}: {m['samples']} samples of {m['seen']} rows seen, "
             f"{len(m['shards'])} shards ({total_bytes / 1e6:.1f} MB), {len(m.get('inputs', []))} input(s)",
             "tokens: " + ", ".join(f"{k} {v}" for k, v in m["tokens"].items())]
    if m["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in m["skipped"].items()))
        first: dict[str, str] = {}
        for e in m.get("skipped_examples", []):
            first.setdefault(e["reason"], e["detail"])
        lines += [f"  {reason}: {detail}" for reason, detail in first.items()]
    else:
        lines.append("skipped: none")
    recipe = m.get("recipe", {})
    lines.append(f"recipe: {recipe.get('path', '?')} (sha256 {str(recipe.get('sha256', ''))[:12]})")
    for kind, spec in m.get("tokenizers", {}).items():
        lines.append(f"{kind} tokenizer: {spec['path']} (sha256 {str(spec['sha256'])[:12]})")
    return lines


def verify_shards(path: Path, m: dict[str, Any]) -> list[str]:
    """Each listed shard re-hashed against the manifest; returns the problems found."""
    problems = []
    for s in m["shards"]:
        p = path / s["shard"]
        if not p.is_file():
            problems.append(f"{s['shard']}: missing")
        elif "sha256" in s and file_sha256(p) != s["sha256"]:
            problems.append(f"{s['shard']}: checksum differs from the manifest")
    return problems


def inspect_dataset(path: str | Path, samples: int = 3, backbone: str | Path | None = None, seed: int = 0) -> str:
    """Manifest figures, then ``samples`` samples as stored and as rendered for training (and the
    token counts a step would see when ``backbone`` names a model folder). `mio inspect --verify`
    adds ``verify_shards``."""
    path = Path(path)
    m = read_manifest(path)
    lines = [f"dataset {path}"] + manifest_lines(m)
    from mio.data.reading import DatasetSpec, training_segments

    spec = DatasetSpec(str(path), format="sft" if m["data_type"] == "sft" else "pretrain")
    renderer = None
    if backbone is not None:
        from transformers import AutoTokenizer

        from mio.data.reading import TrainingRenderer
        from mio.vocab import extend_tokenizer, folder_table, is_extended

        tok = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
        # A text-only base shows what a stage extending it (model.extend_vocab) would train on.
        table = folder_table(backbone, tok, extend=True)
        if not is_extended(tok):
            extend_tokenizer(tok, table)
        renderer = TrainingRenderer(tok, table)
    rng = random.Random(seed)
    shown = 0
    for shard in list_shards(path):
        for s in iter_shard(shard):
            if shown >= samples:
                break
            shown += 1
            if s.turns is not None:
                body = " | ".join(f"{t.role}: {describe_segments(t.content)}" for t in s.turns)
            else:
                body = describe_segments(s.segments)
            lines.append(f"- {s.key}: {body}")
            segs, _ = renderer.segments(s, spec, rng) if renderer is not None else training_segments(s, spec, rng)
            lines.append(f"  as trained: {describe_segments(segs)}")
            if renderer is not None:
                ts = renderer.render(s, segs, False)
                lines.append(f"  rendered: {len(ts.input_ids)} tokens, {int((ts.labels != IGNORE_INDEX).sum())} supervised")
        if shown >= samples:
            break
    return "\n".join(lines)

