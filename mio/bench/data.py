"""`mio bench data`: prepared shards -> rendered, packed batches, against plain WebDataset
iteration of the same shards (the floor), measured in one run on one CPU core
(alternating rounds, CPU time of this process).

The shards are synthetic prepared datasets with the token layout of real ones (the stage-II
data types: image-text pairs, web text, interleaved documents, video-text and speech-text pairs with 1.5-15 s of
4-layer codes), written with the real shard writer, so reading them costs what reading real
shards costs. The text tokenizer is a byte-level BPE trained on their texts.

Figures: ``floor_samples_per_s`` (``for s in wds.WebDataset(shards)``, raw members, nothing
decoded), ``pipeline_samples_per_s`` (safe decode, shuffle buffer, templates with random
directions, text tokenizer, vocabulary mapping, token-balanced mixture, best-fit packing,
collation), ``ratio_to_floor`` = pipeline / floor samples per second (goal: at least 0.5), and
``tokens_per_s_per_core`` of packed real tokens, and ``text_tokenizer_time_share``: the part of the
pipeline's time spent inside the backbone's text tokenizer (Rust; the one cost the floor cannot
have, since shards keep text as strings), with the ratio the rest of the pipeline reaches.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from mio.data.reading import DatasetSpec, MixtureBatches
from mio.data.shards import AtomicShardWriter, StoredSample, list_shards
from mio.segments import Image, Segment, Speech, Text, Video
from mio.vocab import extend_tokenizer

WORDS = ("the a cat dog rocket launch pad sky galaxy coffee cup red white warm window market morning "
         "music piano evening bread rain road car door quiet slowly bright small large water tree bird "
         "sings loudly old oak brother plays every city light night star moon river stone").split()

DATA_TYPES = ("image_text", "text", "interleaved", "video_text", "speech_text")


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_sample(data_type: str, rng: random.Random, key: str) -> StoredSample:
    """A stored sample of ``data_type`` with random codes and text of realistic lengths."""
    nprng = np.random.default_rng(rng.getrandbits(32))

    def image() -> Image:
        return Image(nprng.integers(0, 8192, 32))

    segs: list[Segment]
    if data_type == "image_text":
        segs = [image(), Text(_words(rng, 6, 20))]
    elif data_type == "text":
        segs = [Text(_words(rng, 40, 500))]
    elif data_type == "interleaved":
        segs = [Text(_words(rng, 20, 80))]
        for _ in range(rng.randint(1, 4)):
            segs += [image(), Text(" " + _words(rng, 20, 80))]
    elif data_type == "video_text":
        segs = [Video(nprng.integers(0, 8192, (rng.randint(4, 8), 32))), Text(_words(rng, 8, 30))]
    elif data_type == "speech_text":
        frames = rng.randint(75, 750)  # 1.5-15 s at 50 Hz
        segs = [Speech(nprng.integers(0, 1024, (4, frames))), Text(_words(rng, max(3, frames // 25), frames // 12))]
    else:
        raise ValueError(f"no synthetic samples for data type {data_type!r}")
    return StoredSample(key, data_type, segs, source="synthetic")


def write_synthetic(out: Path, data_type: str, samples: int, shard_size: int, seed: int = 0) -> list[str]:
    """A prepared-dataset folder of synthetic samples; returns its shards."""
    rng = random.Random(f"{data_type}:{seed}")
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, samples, shard_size):
        with AtomicShardWriter(out / f"{data_type}-{start // shard_size:05d}.tar") as w:
            for i in range(start, min(start + shard_size, samples)):
                w.write(synthetic_sample(data_type, rng, f"{data_type}-{i:08d}"))
    return list_shards(out)


def text_tokenizer_for(root: Path) -> Any:
    """A byte-level BPE (vocab 2000) trained on the synthetic words and the templates."""
    from mio.model.backbone import train_text_tokenizer
    from mio.templates import PRETRAIN_TEMPLATES

    rng = random.Random(0)
    corpus = [_words(rng, 5, 40) for _ in range(500)] + list(PRETRAIN_TEMPLATES.values())
    return train_text_tokenizer(corpus, vocab_size=2000)


class Clock:
    """CPU seconds of this process (one core: torch and the tokenizer run single-threaded), so
    other work on the machine does not count against either side."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, step: Any, seconds: float) -> int:
        """Calls ``step()`` until ``seconds`` of CPU time passed; returns how many calls ran."""
        calls, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            step()
            calls += 1
        self.seconds += time.process_time() - start
        return calls


FLOOR_CHUNK = 100  # samples per floor step, so the step's own call costs the floor nothing


def floor_step(shards: list[str]) -> Any:
    """One call = ``FLOOR_CHUNK`` samples of plain WebDataset iteration (raw members), pass after pass."""
    state = {"it": iter(())}

    def step() -> None:
        for _ in range(FLOOR_CHUNK):
            sample = next(state["it"], None)
            if sample is None:
                state["it"] = iter(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
                next(state["it"])

    return step


def bench_data(samples_per_type: int = 2000, shard_size: int = 500, seconds: float = 6.0, rounds: int = 4,
               context_length: int = 2800, batch_size: int = 4, warmup_batches: int = 20) -> dict[str, Any]:
    """Floor and pipeline measured in alternating rounds of ``seconds / rounds`` CPU seconds."""
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the tokenizer's thread pool stays off
    with tempfile.TemporaryDirectory(prefix="mio-bench-data-") as tmp:
        root = Path(tmp)
        shards: list[str] = []
        for data_type in DATA_TYPES:
            shards += write_synthetic(root / data_type, data_type, samples_per_type, shard_size)
        tokenizer = text_tokenizer_for(root)
        table = extend_tokenizer(tokenizer)
        # Equal sample shares: the pipeline reads the same mix of samples as the floor does.
        specs = [DatasetSpec(name) for name in DATA_TYPES]
        mixture = MixtureBatches(specs, root, tokenizer, table, context_length, batch_size,
                                 balance="samples", seed=0)
        tokenizer_seconds = [0.0]
        segment_renderer = mixture.renderer.renderer
        encode = segment_renderer._encode

        def timed_encode(texts: list[str], **kw: Any) -> Any:
            t = time.process_time()
            out = encode(texts, **kw)
            tokenizer_seconds[0] += time.process_time() - t
            return out

        segment_renderer._encode = timed_encode
        batches = iter(mixture)
        for _ in range(warmup_batches):  # fills the shuffle buffers and the packer's open packs
            next(batches)
        stats = mixture.packer.stats  # samples the packer took in: rendered, packed or waiting
        n0, t0, tok0 = stats.samples_in, stats.tokens, tokenizer_seconds[0]
        floor_clock, pipe_clock = Clock(), Clock()
        floor, n_batches = floor_step(shards), 0
        floor_n = 0
        for _ in range(rounds):
            floor_n += FLOOR_CHUNK * floor_clock.run(floor, seconds / rounds)
            n_batches += pipe_clock.run(lambda: next(batches), seconds / rounds)
        n_samples, n_tokens = stats.samples_in - n0, stats.tokens - t0
        tokenizer_share = (tokenizer_seconds[0] - tok0) / pipe_clock.seconds
    floor_rate = floor_n / floor_clock.seconds
    pipeline = n_samples / pipe_clock.seconds
    return {
        "bench": "data",
        "cores": 1,
        "clock": "process CPU seconds",
        "floor_samples_per_s": round(floor_rate, 1),
        "floor_samples": floor_n,
        "pipeline_samples_per_s": round(pipeline, 1),
        "pipeline_samples": n_samples,
        "ratio_to_floor": round(pipeline / floor_rate, 3),
        "tokens_per_s_per_core": round(n_tokens / pipe_clock.seconds, 1),
        "text_tokenizer_time_share": round(tokenizer_share, 3),
        "ratio_to_floor_without_text_tokenizer": round(pipeline / (1 - tokenizer_share) / floor_rate, 3),
        "batches": n_batches,
        "packing_efficiency": round(stats.efficiency, 4),
        "context_length": context_length,
        "render_errors": dict(mixture.errors),
    }
