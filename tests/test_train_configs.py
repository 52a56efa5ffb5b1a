"""The full-size stage YAMLs hold the paper's settings and parse (through `mio fit --print_config`,
alone and with the 7B cluster overlay); the FSDP2 overlay builds mio's strategy: bf16 compute, fp32
reduction, each layer recomputed once (by the model, not also by the strategy)."""

from __future__ import annotations

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from train_support import ROOT

from mio.train.cli import fit
from mio.train.sharding import FSDP2Strategy

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
    assert cfg["checkpoint"]["every_n_train_steps"] == 500 and trainer["enable_checkpointing"] is False
    if stage in PAPER:
        steps, speech_share = PAPER[stage]
        weights = {d["path"]: d["weight"] for d in data["datasets"]}
        speech = sum(w for p, w in weights.items() if p.startswith("speech_text"))
        assert trainer["max_steps"] == steps and speech / sum(weights.values()) == speech_share
        # Long runs: z-loss and the spike guard in the pretraining stages.
        assert model["z_loss"] == 1e-5 and model["guard"]["spike_factor"] == 2.0 and model["guard"]["enabled"]
    else:
        assert all(d["format"] == "sft" for d in data["datasets"]) and len(data["datasets"]) == 16
        assert model["z_loss"] == 0.0 and model["guard"] is None  # SFT: non-finite steps skipped, no spike check


def test_stages_chain_through_their_output_folders(capsys):
    previous = "checkpoints/base"
    for stage in ("1_alignment", "2_interleaved", "3_speech", "4_sft"):
        cfg = resolved(capsys, f"{stage}.yaml")
        assert cfg["model"]["backbone"] == previous and cfg["model"]["extend_vocab"] == (stage == "1_alignment")
        previous = f"{cfg['trainer']['default_root_dir']}/model"


def test_cluster_overlay_parses_over_a_stage(capsys):
    cfg = resolved(capsys, "2_interleaved.yaml", "cluster/fsdp2_7b.yaml")
    assert cfg["trainer"]["num_nodes"] == 4 and cfg["trainer"]["devices"] == 8
    assert cfg["trainer"]["precision"] == "bf16-mixed"  # the stage's
    assert cfg["data"]["datasets"][-1]["path"] == "speech_text"  # the stage itself is untouched
    assert cfg["model"]["gradient_checkpointing"] is True


def test_fsdp2_overlay_builds_mios_strategy():
    spec = yaml.safe_load((STAGES / "cluster" / "fsdp2_7b.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": spec})).strategy
    assert isinstance(strategy, FSDP2Strategy) and not strategy.hybrid and strategy.reshard_after_forward
    assert (strategy.policy.param_dtype, strategy.policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="param_dtype 'bf16'"):
        FSDP2Strategy(param_dtype="bf16")
