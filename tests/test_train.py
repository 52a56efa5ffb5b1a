"""A tiny stage end to end: prepare -> mio fit (LightningCLI) -> a save_pretrained folder that vanilla
transformers loads with the same logits, recording its vocabulary, tokenizer specs and config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mio.data.prepare import prepare
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone
from mio.train.cli import fit
from mio.vocab import VocabTable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for name in ("image_text", "speech_text", "sft"):
        prepare(ROOT / "data_recipes" / "demo" / f"{name}.yaml", out / "data" / name, tokenizer_dir=ROOT / "tokenizers" / "tiny")
    texts = [json.loads(l)["caption"] for l in (ROOT / "data_recipes/samples/image_text.jsonl").read_text().splitlines()]
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, text_vocab_size=300)
    build_tiny_backbone(texts * 3, cfg, out / "base")
    return out


def run_stage(prepared: Path, config: str, backbone: Path, name: str, *extra: str) -> Path:
    return fit(["--config", str(ROOT / "stages" / "tiny" / config), f"--model.backbone={backbone}",
                f"--data.root={prepared / 'data'}", f"--trainer.default_root_dir={prepared / name}",
                "--trainer.max_steps=3", "--data.context_length=512", "--trainer.enable_progress_bar=false",
                "--data.datasets=[{path: image_text, weight: 2}, {path: speech_text, weight: 1}]", *extra])


def test_stage_output_loads_in_vanilla_transformers(prepared):
    out = run_stage(prepared, "1_alignment.yaml", prepared / "base", "s1")
    assert out == prepared / "s1" / "model"
    table = VocabTable.load(out)
    specs = json.loads((out / "mio_tokenizers.json").read_text())
    assert set(specs) == {"image", "speech"} and specs["image"]["content"]["kind"] == "seed"
    assert "max_steps: 3" in (out / "mio_stage_config.yaml").read_text()
    vanilla = AutoModelForCausalLM.from_pretrained(out)  # no mio code involved
    ours, tok, table2 = load_backbone(out)
    assert table2 == table and len(tok) == table.total_size
    ids = torch.tensor([[tok.bos_token_id, table.image_begin, table.image_start + 5, table.image_end, 7]])
    torch.testing.assert_close(vanilla(ids).logits, ours(ids).logits, rtol=0, atol=0)
    # Training moved the weights away from the freshly extended backbone.
    base, _, _ = load_backbone(prepared / "base", extend=True)
    assert not torch.allclose(base.get_input_embeddings().weight, ours.get_input_embeddings().weight)


def test_next_stage_inherits_and_sft_trains(prepared):
    s1 = run_stage(prepared, "1_alignment.yaml", prepared / "base", "a1")
    out = fit(["--config", str(ROOT / "stages" / "tiny" / "4_sft.yaml"), f"--model.backbone={s1}",
               f"--data.root={prepared / 'data'}", f"--trainer.default_root_dir={prepared / 'a4'}",
               "--trainer.max_steps=2", "--data.context_length=1024", "--trainer.enable_progress_bar=false",
               "--trainer.log_every_n_steps=1"])
    assert VocabTable.load(out) == VocabTable.load(s1)
    assert json.loads((out / "mio_tokenizers.json").read_text()).keys() >= {"image", "speech"}
    metrics = (prepared / "a4" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/packing_efficiency" in metrics


def test_extending_an_extended_backbone_fails_before_training(prepared):
    s1 = run_stage(prepared, "1_alignment.yaml", prepared / "base", "b1")
    with pytest.raises(ValueError, match="extended before"):
        run_stage(prepared, "1_alignment.yaml", s1, "b2")
