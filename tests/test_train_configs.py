"""The full-size stage YAMLs hold the paper's settings and parse (through `mio fit --print_config`,
alone and with the 7B cluster overlays); the FSDP overlay builds its strategy with the decoder layer
as the wrap and recompute unit."""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mio.train.cli import fit
from train_support import ROOT

STAGES = ROOT / "stages"
# Paper, Table 2: steps and the speech-text share of the tokens.
PAPER = {"1_alignment": (24800, 0.125), "2_interleaved": (12800, 0.375), "3_speech": (32200, 0.75)}


def resolved(capsys, *configs: str) -> dict:  # noqa: ANN001
    with pytest.raises(SystemExit) as done:
        fit([arg for c in configs for arg in ("--config", str(STAGES / c))] + ["--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("stage", ["1_alignment", "2_interleaved", "3_speech", "4_sft"])
def test_full_stage_has_the_papers_settings(stage, capsys):
    cfg = resolved(capsys, f"{stage}.yaml")
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    assert (model["lr"], model["warmup_ratio"], trainer["gradient_clip_val"]) == (3e-5, 0.03, 1.0)
    assert (data["context_length"], trainer["precision"], model["attn_backend"]) == (2800, "bf16-mixed", "flash")
    assert data["batch_size"] % data["num_workers"] == 0
    assert cfg["checkpoint"]["every_n_train_steps"] == 500 and trainer["enable_checkpointing"] is not None
    if stage in PAPER:
        steps, speech_share = PAPER[stage]
        weights = {d["path"]: d["weight"] for d in data["datasets"]}
        speech = sum(w for p, w in weights.items() if p.startswith("speech_text"))
        assert trainer["max_steps"] == steps and speech / sum(weights.values()) == speech_share
    else:
        assert all(d["format"] == "sft" for d in data["datasets"]) and len(data["datasets"]) == 16


def test_stages_chain_through_their_output_folders(capsys):
    previous = "checkpoints/base"
    for stage in ("1_alignment", "2_interleaved", "3_speech", "4_sft"):
        cfg = resolved(capsys, f"{stage}.yaml")
        assert cfg["model"]["backbone"] == previous and cfg["model"]["extend_vocab"] == (stage == "1_alignment")
        previous = f"{cfg['trainer']['default_root_dir']}/model"


@pytest.mark.parametrize("overlay", ["fsdp_7b.yaml", "deepspeed_zero2_7b.yaml"])
def test_cluster_overlays_parse_over_a_stage(overlay, capsys):
    cfg = resolved(capsys, "2_interleaved.yaml", f"cluster/{overlay}")
    assert cfg["trainer"]["num_nodes"] == 4 and cfg["trainer"]["devices"] == 8
    assert cfg["data"]["datasets"][-1]["path"] == "speech_text"  # the stage itself is untouched
    # One way of recomputing activations, not two.
    strategy_recomputes = "activation_checkpointing_policy" in cfg["trainer"]["strategy"]["init_args"] and \
        cfg["trainer"]["strategy"]["init_args"]["activation_checkpointing_policy"]
    assert bool(strategy_recomputes) != cfg["model"]["gradient_checkpointing"]


def test_fsdp_overlay_wraps_and_recomputes_each_decoder_layer():
    spec = yaml.safe_load((STAGES / "cluster" / "fsdp_7b.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": spec})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._state_dict_type == "sharded"
