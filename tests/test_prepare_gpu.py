"""Media tokenization on a GPU (skipped without one): a recipe prepared with the tokenizers on CUDA
gives the samples and (almost always) the codes of a CPU run; `mio bench tokenizers` measures each
batch size on the GPU in bfloat16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mio.data.prepare import prepare
from mio.data.shards import iter_shard, list_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_image_text_on_cuda_matches_cpu(tmp_path):
    codes = {}
    for device in ("cpu", "cuda"):
        spec = yaml.safe_load((ROOT / "tokenizers" / "tiny" / "seed.yaml").read_text())
        spec["device"] = device
        (tmp_path / device).mkdir()
        (tmp_path / device / "seed.yaml").write_text(yaml.safe_dump(spec))
        m = prepare(ROOT / "data_recipes" / "demo" / "image_text.yaml", tmp_path / f"out-{device}",
                    tokenizer_dir=tmp_path / device)
        assert m["samples"] == 16
        codes[device] = np.stack([s.segments[0].codes for sh in list_shards(tmp_path / f"out-{device}")
                                  for s in iter_shard(sh)])
    assert (codes["cpu"] == codes["cuda"]).mean() > 0.95


@pytest.mark.gpu
def test_bench_tokenizers_runs_each_batch_on_cuda_in_bf16():
    """`mio bench tokenizers`' GPU figures (tiny models here: the full-size ones take the bench's time)."""
    import torch

    from mio.bench.tokenizers import by_batch_figures
    from mio.tokenizers import build_tokenizer

    tiny = ROOT / "tokenizers" / "tiny"
    image, speech = build_tokenizer(tiny / "seed.yaml"), build_tokenizer(tiny / "speechtokenizer.yaml")
    config = yaml.safe_load((tiny / "speechtokenizer.yaml").read_text())["model"]
    figures = by_batch_figures(image.model, "bilinear", speech.model, config, torch.device("cuda"), torch.bfloat16,
                               (1, 16, 64))
    assert figures["device"] == "cuda" and figures["dtype"] == "bfloat16"
    assert image.model.quantize.embedding.weight.dtype == torch.bfloat16  # the weights moved, not a copy
    for key in ("seed_images_per_s", "speech_audio_s_per_s"):
        assert sorted(figures[key]) == ["1", "16", "64"] and min(figures[key].values()) > 0
