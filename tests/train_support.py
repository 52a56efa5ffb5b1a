"""Shared by the training tests: small synthetic prepared datasets (the real shard writer, random
codes, short texts, manifests naming the tiny tokenizer specs) and a tiny text-only base model.

Synthetic shards instead of `mio prepare` keep the suite fast; the samples have the stored form of
real ones, so the reader, templates, packer and model see what a real stage sees.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from mio.data.shards import AtomicShardWriter, StoredSample
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone
from mio.segments import Image, Speech, Text, Video
from mio.templates import Turn

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZERS = ROOT / "tokenizers" / "tiny"
WORDS = "a cat dog red rocket on the launch pad hello world coffee in white cup speech video image".split()
# The tiny stages' datasets and the modality tokenizers their samples need.
DATASETS = {"image_text": ("image",), "text": (), "interleaved": ("image",), "video_text": ("video", "image"),
            "video_interleaved": ("video", "image"), "speech_text": ("speech",), "sft": ("image", "speech")}
SPEC_FILES = {"image": "seed.yaml", "speech": "speechtokenizer.yaml", "video": "video.yaml"}


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_sample(data_type: str, i: int, rng: random.Random) -> StoredSample:
    nprng = np.random.default_rng(rng.getrandbits(32))
    image = lambda: Image(nprng.integers(0, 8192, 32))  # noqa: E731
    key = f"{data_type}-{i:04d}"
    if data_type == "image_text":
        return StoredSample(key, data_type, [image(), Text(_words(rng, 3, 10))])
    if data_type == "text":
        return StoredSample(key, data_type, [Text(_words(rng, 10, 40))])
    if data_type == "interleaved":
        return StoredSample(key, data_type, [Text(_words(rng, 3, 8)), image(), Text(" " + _words(rng, 3, 8))])
    if data_type == "video_text":
        return StoredSample(key, data_type, [Video(nprng.integers(0, 8192, (2, 32))), Text(_words(rng, 3, 8))])
    if data_type == "video_interleaved":
        return StoredSample(key, data_type, [Text(_words(rng, 3, 8)), Video(nprng.integers(0, 8192, (2, 32)))])
    if data_type == "speech_text":
        return StoredSample(key, data_type, [Speech(nprng.integers(0, 1024, (4, rng.randint(5, 15)))),
                                             Text(_words(rng, 2, 6))])
    if data_type == "sft":
        media = image() if i % 2 else Speech(nprng.integers(0, 1024, (4, rng.randint(5, 10))))
        turns = [Turn("user", [Text(_words(rng, 2, 6) + " "), media]), Turn("assistant", [Text(_words(rng, 2, 8))])]
        return StoredSample(key, data_type, turns=turns, task="chat")
    raise ValueError(data_type)


def write_dataset(out: Path, data_type: str, samples: int, shards: int = 1, seed: int = 0) -> Path:
    """A prepared dataset folder: shards of synthetic samples and a manifest naming the tiny
    tokenizer specs its media were (notionally) made with."""
    rng = random.Random(f"{data_type}:{seed}")
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-samples // shards)
    for s in range(shards):
        with AtomicShardWriter(out / f"{data_type}-{s:05d}.tar") as w:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                w.write(synthetic_sample(data_type, i, rng))
    tokenizers = {}
    for kind in DATASETS[data_type]:
        path = TINY_TOKENIZERS / SPEC_FILES[kind]
        tokenizers[kind] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps({"data_type": data_type, "samples": samples,
                                                   "tokenizers": tokenizers}))
    return out


def stage_data(root: Path, samples: int = 24) -> Path:
    """Every dataset the tiny stage YAMLs name, under ``root``."""
    for name in DATASETS:
        if not (root / name / "manifest.json").is_file():
            write_dataset(root / name, name, samples)
    return root


def tiny_base(out: Path, text_vocab_size: int = 300, hidden_size: int = 64, intermediate_size: int = 128) -> Path:
    """A text-only tiny Llama (2 layers, width 64) with a byte-level BPE trained on the words."""
    if (out / "config.json").is_file():
        return out
    rng = random.Random(0)
    texts = [_words(rng, 3, 12) for _ in range(200)]
    cfg = TinyLlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                          text_vocab_size=text_vocab_size, max_position_embeddings=1024)
    return build_tiny_backbone(texts, cfg, out)


def shared_root(tmp_path_factory) -> Path:  # noqa: ANN001 (pytest's TempPathFactory)
    """One folder per test session with the stage data and the base model (built once)."""
    root = tmp_path_factory.getbasetemp() / "mio-train-shared"
    stage_data(root / "data")
    tiny_base(root / "base")
    return root


def tiny_args(root: Path, out: Path, *extra: str, config: str = "1_alignment.yaml", steps: int = 3,
              context: int = 256) -> list[str]:
    """`mio fit` arguments: a tiny stage YAML on the shared data with small settings."""
    return ["--config", str(ROOT / "stages" / "tiny" / config), f"--model.backbone={root / 'base'}",
            f"--data.root={root / 'data'}", f"--trainer.default_root_dir={out}", f"--trainer.max_steps={steps}",
            f"--data.context_length={context}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra]


def ledger(run: Path, rank: int = 0) -> list[dict]:
    path = run / "ledger" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
