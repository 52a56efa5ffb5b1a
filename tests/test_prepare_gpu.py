"""Media tokenization on a GPU (skipped without one): a recipe prepared with the tokenizers on CUDA
gives the samples and (almost always) the codes of a CPU run."""

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
