"""`mio bench data`: the training reader -- prepared shards -> rendered, packed micro-batches, the
path `mio fit` trains on -- against plain WebDataset iteration of the same shards (the floor),
measured in one run on one CPU core (alternating rounds, CPU time of this process); and the speech
share that the training loop itself logs over 200 optimizer steps of each full-size stage mixture.

The shards are synthetic prepared datasets with the token layout of real ones (image-text pairs,
web text, interleaved documents, video-text pairs and interleaved video, speech-text pairs with
1.5-15 s of 4-layer codes), written with the real shard writer, so reading them costs what reading
real shards costs. The text tokenizer is a byte-level BPE trained on their texts.

Figures: ``floor_samples_per_s`` (``for s in wds.WebDataset(shards)``: raw members, nothing
decoded), ``tar_stage_samples_per_s`` (mio's tar stage alone, :mod:`mio.data.tars`),
``pipeline_samples_per_s`` and ``tokens_per_s_per_core`` (the DataModule's micro-batches: the tar
stage, safe decode, shuffle buffer, templates with random directions, text tokenizer, vocabulary
mapping, token-balanced mixture, best-fit packing, collation; target >= 1,000,000 packed tokens
per second per core), ``ratio_to_floor``; ``stage_speech_shares``: ``train/share_speech`` as
`mio fit` logs it over ``stage_steps`` optimizer steps of stages/1_alignment.yaml,
2_interleaved.yaml and 3_speech.yaml (their weights, templates and 2800-token context; a small
random backbone, one pack per step, on CPU), against 0.125, 0.375 and 0.75; ``errors``: what the
pipeline's reading lost, per reason.
"""

from __future__ import annotations

import csv
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
import yaml

from mio.assets import STAGES as STAGE_CONFIGS
from mio.data.reading import ERROR_REASONS, DataCounts, DatasetSpec
from mio.data.shards import MANIFEST, SHARD_FORMAT, AtomicShardWriter, StoredSample, list_shards, write_json_atomic
from mio.data.tars import tar_samples
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone
from mio.segments import Image, Segment, Speech, Text, Video
from mio.templates import PRETRAIN_TEMPLATES

STAGES = {"1_alignment": 0.125, "2_interleaved": 0.375, "3_speech": 0.75}  # speech token share of each stage
# Small enough that 200 steps of 2800-token packs take seconds on a CPU; the share does not
# depend on the model.
SHARE_BACKBONE = TinyLlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                 num_key_value_heads=1, max_position_embeddings=4096, text_vocab_size=2000)

WORDS = ("the a cat dog rocket launch pad sky galaxy coffee cup red white warm window market morning "
         "music piano evening bread rain road car door quiet slowly bright small large water tree bird "
         "sings loudly old oak brother plays every city light night star moon river stone").split()

DATA_TYPES = ("image_text", "text", "interleaved", "video_text", "video_interleaved", "speech_text")


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
    elif data_type == "video_interleaved":  # scene key frames between the narration's sentences
        segs = [Text(_words(rng, 10, 40))]
        for _ in range(rng.randint(1, 3)):
            segs += [Video(nprng.integers(0, 8192, (rng.randint(2, 6), 32))), Text(" " + _words(rng, 10, 40))]
    elif data_type == "speech_text":
        frames = rng.randint(75, 750)  # 1.5-15 s at 50 Hz
        segs = [Speech(nprng.integers(0, 1024, (4, frames))), Text(_words(rng, max(3, frames // 25), frames // 12))]
    else:
        raise ValueError(f"no synthetic samples for data type {data_type!r}")
    return StoredSample(key, data_type, segs, source="synthetic")


def write_synthetic(out: Path, data_type: str, samples: int, shard_size: int, seed: int = 0) -> list[str]:
    """A prepared-dataset folder of synthetic samples (shards and a manifest); returns its shards."""
    rng = random.Random(f"{data_type}:{seed}")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, samples, shard_size):
        with AtomicShardWriter(out / f"{data_type}-{start // shard_size:05d}.tar") as w:
            for i in range(start, min(start + shard_size, samples)):
                w.write(synthetic_sample(data_type, rng, f"{data_type}-{i:08d}"))
        shards.append(w.info())
    write_json_atomic(out / MANIFEST, {"format": SHARD_FORMAT, "data_type": data_type, "samples": samples,
                                       "shards": shards, "tokenizers": {}})
    return list_shards(out)


def corpus() -> list[str]:
    """Texts like the synthetic samples' and the templates, to train the text tokenizer on."""
    rng = random.Random(0)
    return [_words(rng, 5, 40) for _ in range(500)] + list(PRETRAIN_TEMPLATES.values())


class CpuClock:
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


def datamodule(root: Path, backbone: Path, specs: list[DatasetSpec], context_length: int, batch_size: int) -> Any:
    """The stage's DataModule over ``root``, set up as `mio fit` sets it up (without a trainer)."""
    from mio.train.data import MioDataModule

    dm = MioDataModule(specs, root=str(root), context_length=context_length, batch_size=batch_size,
                       backbone=str(backbone), extend_vocab=True, balance="samples")
    dm.setup("fit")
    return dm


def read_rates(shards: list[str], batches: Any, datasets: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Floor, tar stage and pipeline, in alternating rounds of ``seconds / rounds / 3`` CPU seconds each."""
    floor = _passes(lambda: wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    tar = _passes(lambda: tar_samples(shards))
    clocks = {"floor": CpuClock(), "tar": CpuClock(), "pipeline": CpuClock()}
    floor_n = tar_n = steps = 0
    counts = DataCounts(datasets)  # what the micro-batches carry: samples read, real tokens, errors

    def micro_batch() -> None:
        counts.add(next(batches)["data"])

    for _ in range(rounds):
        floor_n += FLOOR_CHUNK * clocks["floor"].run(floor, seconds / rounds / 3)
        tar_n += FLOOR_CHUNK * clocks["tar"].run(tar, seconds / rounds / 3)
        steps += clocks["pipeline"].run(micro_batch, seconds / rounds / 3)
    samples = int(counts.read.sum())
    return {"floor_samples_per_s": round(floor_n / clocks["floor"].seconds, 1),
            "tar_stage_samples_per_s": round(tar_n / clocks["tar"].seconds, 1),
            "pipeline_samples_per_s": round(samples / clocks["pipeline"].seconds, 1),
            "tokens_per_s_per_core": round(int(counts.tokens.sum()) / clocks["pipeline"].seconds, 1),
            "pipeline_samples": samples, "micro_batches": steps,
            "errors": {r: int(n) for r, n in zip(ERROR_REASONS, counts.errors.sum(axis=0))}}


def _passes(make: Any) -> Any:
    """One call = ``FLOOR_CHUNK`` samples of ``make()``'s iterable, pass after pass."""
    state = {"it": iter(())}

    def step() -> None:
        for _ in range(FLOOR_CHUNK):
            if next(state["it"], None) is None:
                state["it"] = iter(make())
                next(state["it"])

    return step


def stage_datasets(stage: str, root: Path) -> tuple[Path, list[DatasetSpec], dict[str, Any]]:
    """The stage YAML, its mixture and its data settings; each dataset name a link under ``root``
    to the synthetic dataset of its data type (``image_text_hq`` -> ``image_text``)."""
    config = STAGE_CONFIGS / f"{stage}.yaml"
    data = yaml.safe_load(config.read_text())["data"]
    specs = [DatasetSpec(**d) for d in data["datasets"]]
    for spec in specs:
        data_type = next(t for t in sorted(DATA_TYPES, key=len, reverse=True) if spec.path.startswith(t))
        if not (root / spec.path).exists():
            (root / spec.path).symlink_to(root / data_type)
    return config, specs, data


def stage_share(stage: str, root: Path, backbone: Path, out: Path, steps: int, rows: int = 1) -> dict[str, float]:
    """``train/share_speech`` and the per-dataset shares that `mio fit` logs over ``steps``
    optimizer steps of ``rows`` packs of the stage's mixture (one log line: over all of them)."""
    from mio.train.cli import fit

    config, _, _ = stage_datasets(stage, root)
    fit(["--config", str(config), f"--model.backbone={backbone}", "--model.extend_vocab=true",
         "--model.attn_backend=sdpa", "--model.gradient_checkpointing=false", f"--data.root={root}",
         f"--data.batch_size={rows}", "--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.max_steps={steps}",
         f"--trainer.log_every_n_steps={steps}", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         f"--trainer.default_root_dir={out}", f"--model.output_dir={out / 'model'}"])
    rows = list(csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open()))
    logged = next(r for r in rows if r.get("train/share_speech"))
    return {k.removeprefix("train/"): round(float(v), 4) for k, v in logged.items() if k.startswith("train/share")}


def bench_data(samples_per_type: int = 2000, shard_size: int = 500, seconds: float = 9.0, rounds: int = 4,
               context_length: int = 2800, batch_size: int = 4, warmup_batches: int = 20,
               stage_steps: int = 200) -> dict[str, Any]:
    """The reading rates on one core, then the three stages' logged speech shares."""
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the tokenizer's thread pool stays off
    with tempfile.TemporaryDirectory(prefix="mio-bench-data-") as tmp:
        root = Path(tmp) / "data"
        shards: list[str] = []
        for data_type in DATA_TYPES:
            shards += write_synthetic(root / data_type, data_type, samples_per_type, shard_size)
        backbone = build_tiny_backbone(corpus(), SHARE_BACKBONE, Path(tmp) / "base")
        # Equal sample shares: the pipeline reads the same mix of samples as the floor does.
        dm = datamodule(root, backbone, [DatasetSpec(name) for name in DATA_TYPES], context_length, batch_size)
        batches = iter(dm.train_dataloader())
        for _ in range(warmup_batches):  # fills the shuffle buffers and the packer's open packs
            next(batches)
        rates = read_rates(shards, batches, len(DATA_TYPES), seconds, rounds)
        torch.set_num_threads(os.cpu_count() or 1)
        shares = {stage: stage_share(stage, root, backbone, Path(tmp) / stage, stage_steps) for stage in STAGES}
    return {
        "bench": "data",
        "cores": 1,
        "clock": "process CPU seconds",
        **rates,
        "ratio_to_floor": round(rates["pipeline_samples_per_s"] / rates["floor_samples_per_s"], 3),
        "context_length": context_length,
        "stage_speech_shares": {stage: s["share_speech"] for stage, s in shares.items()},
        "stage_speech_targets": STAGES,
        "stage_steps": stage_steps,
        "stage_shares": shares,
    }
