"""The tiny stages end to end through `mio fit` (LightningCLI): I -> II -> III -> SFT (and LoRA SFT),
each starting from the previous stage's output folder, which vanilla transformers loads with the
same logits and which records its vocabulary, tokenizer specs and resolved config; the logged
figures of a step (loss and token share per modality, packing, tokens/s, TFLOP/s)."""

import csv
import json

import pytest
import torch
from train_support import shared_root, tiny_args
from transformers import AutoModelForCausalLM

from mio.model.backbone import load_backbone
from mio.train.cli import fit
from mio.vocab import VocabTable

pytestmark = pytest.mark.slow  # the tiny stages, trained in a chain

STAGES = ("1_alignment.yaml", "2_interleaved.yaml", "3_speech.yaml", "4_sft.yaml")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The four tiny stages in sequence, two steps each; {stage: output folder}."""
    root = shared_root(tmp_path_factory)
    out, backbone = {}, root / "base"
    for config in STAGES:
        name = config.removesuffix(".yaml")
        args = tiny_args(root, root / "runs" / name, f"--model.backbone={backbone}", "--trainer.log_every_n_steps=1",
                         config=config, steps=2)
        backbone = out[name] = fit(args)
    return root, out


def test_every_stage_starts_from_the_previous_output(chain):
    root, out = chain
    assert list(out) == [s.removesuffix(".yaml") for s in STAGES]
    tables = {name: VocabTable.load(folder) for name, folder in out.items()}
    assert len(set(map(json.dumps, (t.to_dict() for t in tables.values())))) == 1
    for name, folder in out.items():
        config = (folder / "mio_stage_config.yaml").read_text()
        assert "max_steps: 2" in config and f"default_root_dir: {root / 'runs' / name}" in config
        specs = json.loads((folder / "mio_tokenizers.json").read_text())
        assert specs["image"]["content"]["kind"] == "seed" and specs["speech"]["content"]["kind"] == "speechtokenizer"
    assert f"backbone: {out['3_speech']}" in (out["4_sft"] / "mio_stage_config.yaml").read_text()
    # Training moved the weights: stage II's output differs from stage I's.
    one, _, _ = load_backbone(out["1_alignment"])
    two, _, _ = load_backbone(out["2_interleaved"])
    assert not torch.equal(one.get_input_embeddings().weight, two.get_input_embeddings().weight)


def test_stage_output_loads_in_vanilla_transformers(chain):
    _, out = chain
    folder = out["4_sft"]
    vanilla = AutoModelForCausalLM.from_pretrained(folder)  # no mio code involved
    ours, tok, table = load_backbone(folder)
    assert len(tok) == table.total_size
    ids = torch.tensor([[tok.bos_token_id, table.image_begin, table.image_start + 5, table.image_end,
                         table.speech_begin, table.speech_start + 1000, table.speech_end, 7]])
    torch.testing.assert_close(vanilla(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_steps_log_the_figures_of_the_issue(chain):
    root, _ = chain
    logged = list(csv.DictReader((root / "runs" / "2_interleaved" / "logs" / "version_0" / "metrics.csv").open()))
    rows = [r for r in logged if r["train/loss"]]
    assert len(rows) == 2
    # The learning rate, one row per logging step beside the step's own (Lightning's LearningRateMonitor).
    assert len([r for r in logged if r["lr-AdamW/pg1"]]) == 2
    for key in ("train/loss", "train/loss_text", "train/loss_image", "train/loss_speech", "train/share_text",
                "train/share_image", "train/share_speech", "train/packing_efficiency"):
        assert all(r[key] for r in rows), key
    shares = [float(rows[0][f"train/share_{m}"]) for m in ("text", "image", "speech")]
    assert sum(shares) == pytest.approx(1.0)
    assert 0 < float(rows[0]["train/packing_efficiency"]) <= 1
    # Throughput needs two steps: the first only starts the clock.
    assert float(rows[1]["train/tokens_per_sec"]) > 0 and float(rows[1]["train/tflops_per_device"]) > 0
    assert list((root / "runs" / "2_interleaved" / "tensorboard").glob("version_0/events.out.tfevents.*"))


def test_lora_sft_stage_writes_an_adapter(chain):
    root, out = chain
    args = tiny_args(root, root / "runs" / "4_sft_lora", f"--model.backbone={out['3_speech']}",
                     "--data.datasets=[{path: sft, format: sft}]", config="4_sft_lora.yaml", steps=2)
    adapter = fit(args)
    assert adapter == root / "runs" / "4_sft_lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
