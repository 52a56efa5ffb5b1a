"""FSDP2 (stages/tiny/fsdp2.yaml, mio/train/sharding.py) on CPU with gloo, `mio fit` starting its
second process itself as on a laptop: sharded training equals one unsharded process, distributed checkpoints resume on another
number of processes to the same losses, a kill during a save leaves the previous checkpoint, LoRA
with trainable added-token rows trains sharded, and no rank but rank 0 holds the whole model while
loading.

One chain of runs on the same global batch rows (2 rows per step: 1 per process under 2 processes):
    reference  1 process, unsharded, steps 1-5
    killed     2 processes, FSDP2: steps 1-2, then SIGKILLed while saving the checkpoint of step 3
    resumed1   1 process, FSDP2: resumes from `last` (step 2, written by 2 processes), steps 3-5
    resumed2   2 processes, FSDP2: resumes from resumed1's step 3 (written by 1 process), steps 4-5
The tiny stage's lr is replaced by the full stages' 3e-5: Adam turns the last-bit differences of
a reduction into steps of up to lr on weights with near-zero gradients, so the tolerance is set by
the lr; an update from a wrong gradient still moves a weight by about lr, 30x the tolerance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mio.train.checkpoint import find_last
from mio.train.cli import fit
from train_support import ROOT, ledger, shared_root, tiny_args, tiny_base

STEPS = 5
TOLERANCE = 1e-5  # relative to each tensor's largest value (weights) or to the loss
SHARDED = ("--config", str(ROOT / "stages" / "tiny" / "fsdp2.yaml"))
ONE_PROCESS = ("--trainer.devices=1", "--data.batch_size=2")  # the 2 rows of a step in one process
COMMON = ("--model.lr=3e-5", "--data.datasets=[{path: image_text}, {path: speech_text}]", "--data.buffer_size=2",
          "--trainer.log_every_n_steps=1", "--trainer.enable_checkpointing=true",
          "--trainer.callbacks+=mio.train.checkpoint.AtomicCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
          "--trainer.callbacks.keep_last=5", "--trainer.callbacks+=mio.train.callbacks.SampleLedger")
LORA = ("--model.lora.rank=4", "--model.lora.alpha=8", "--model.lora.dropout=0.0", "--model.lora.train_new_tokens=true")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two cores

# `mio fit` whose every rank dies (SIGKILL) right after writing its shards of the Nth checkpoint,
# before the checkpoint is renamed into place.
KILLED_WHILE_SAVING = """
import os, runpy, signal
from mio.train.sharding import FSDP2Strategy
real, saves = FSDP2Strategy.save_checkpoint, []
def dies(self, checkpoint, filepath, storage_options=None):
    real(self, checkpoint, filepath, storage_options)
    saves.append(filepath)
    if len(saves) == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
FSDP2Strategy.save_checkpoint = dies
runpy.run_module("mio.train.cli", run_name="__main__")
"""


def mio_fit(args: list[str], script: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mio fit` in its own process (it starts a process group); under the FSDP2 overlay Lightning
    starts the second process, as `mio fit` does on a laptop."""
    target = [script] if script else ["-m", "mio.train.cli"]
    return subprocess.run([sys.executable, *target, *args], env=env or ENV, capture_output=True, text=True,
                          timeout=300)


def losses(run: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in ledger(run)}


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = shared_root(tmp_path_factory)
    runs = {name: root / "runs" / f"fsdp2-{name}" for name in ("reference", "killed", "resumed1", "resumed2")}
    fit(tiny_args(root, runs["reference"], *COMMON, *ONE_PROCESS, steps=STEPS))

    script = runs["killed"].parent / "killed_while_saving.py"
    script.write_text(KILLED_WHILE_SAVING)
    killed = mio_fit(tiny_args(root, runs["killed"], *SHARDED, *COMMON, steps=STEPS), script=str(script),
                     env=dict(ENV, KILL_AT_SAVE="3"))
    assert killed.returncode != 0, killed.stderr[-3000:]

    last = find_last(runs["killed"] / "checkpoints")
    resumed1 = mio_fit(tiny_args(root, runs["resumed1"], *SHARDED, *COMMON, *ONE_PROCESS, f"--ckpt_path={last}",
                                     steps=STEPS))
    assert resumed1.returncode == 0, resumed1.stderr[-3000:]
    step3 = runs["resumed1"] / "checkpoints" / "step=3.ckpt"
    resumed2 = mio_fit(tiny_args(root, runs["resumed2"], *SHARDED, *COMMON, f"--ckpt_path={step3}", steps=STEPS))
    assert resumed2.returncode == 0, resumed2.stderr[-3000:]
    return runs


def test_a_kill_while_saving_leaves_the_previous_sharded_checkpoint(chain):
    folder = chain["killed"] / "checkpoints"
    assert find_last(folder) == folder / "step=2.ckpt"
    assert (folder / "step=3.ckpt.partial" / ".metadata").is_file()  # all shards written, never renamed into place
    assert not (folder / "step=3.ckpt").exists()
    # A torch.distributed.checkpoint folder: one file of shards per rank, the rest beside them.
    assert sorted(p.name for p in (folder / "step=2.ckpt").iterdir()) == [".metadata", "__0_0.distcp",
                                                                          "__1_0.distcp", "meta.pt"]
    meta = torch.load(folder / "step=2.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2 and meta["MioDataModule"]["micro_batches"] == 2
    assert len(meta["mio_rng"]) == 2  # every rank's random state


def test_sharded_runs_train_what_one_process_trains_across_world_sizes(chain):
    reference = ledger(chain["reference"])
    want = {line["step"]: line for line in reference}
    assert list(want) == list(range(1, STEPS + 1))
    for name, steps in (("killed", [1, 2]), ("resumed1", [3, 4, 5]), ("resumed2", [4, 5])):
        ranks = [ledger(chain[name], rank) for rank in ((0, 1) if name != "resumed1" else (0,))]
        assert [line["step"] for line in ranks[0]] == steps, name
        for i, step in enumerate(steps):
            # The same rows (one per process under two processes) and the same global loss.
            assert sum((r[i]["keys"] for r in ranks), []) == want[step]["keys"], (name, step)
            assert ranks[0][i]["loss"] == pytest.approx(want[step]["loss"], rel=TOLERANCE), (name, step)
    assert len({line["loss"] for line in reference}) == STEPS  # training moves the loss

    weights = {name: load_file(chain[name] / "model" / "model.safetensors") for name in ("reference", "resumed1",
                                                                                        "resumed2")}
    assert max_relative_error(weights["reference"], weights["resumed1"]) <= TOLERANCE
    assert max_relative_error(weights["reference"], weights["resumed2"]) <= TOLERANCE


def test_sharded_stage_output_loads_in_vanilla_transformers_with_equal_logits(chain):
    ids = torch.tensor([[1, 5, 9, 300, 310, 4000, 12000, 12500, 7]])
    logits = []
    for name in ("reference", "resumed2"):  # resumed2's output was gathered from 2 processes' shards
        model, info = AutoModelForCausalLM.from_pretrained(chain[name] / "model", output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched weights
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_lora_with_trainable_added_rows_trains_sharded_as_in_one_process(chain, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    runs = root / "runs"
    backbone = f"--model.backbone={chain['reference'] / 'model'}"  # an extended stage output
    args = (backbone, "--model.lr=3e-5", *LORA, "--trainer.log_every_n_steps=1",
            "--trainer.callbacks+=mio.train.callbacks.SampleLedger")
    fit(tiny_args(root, runs / "lora1", *args, *ONE_PROCESS, config="4_sft.yaml", steps=3))
    two = mio_fit(tiny_args(root, runs / "lora2", *args, *SHARDED, config="4_sft.yaml", steps=3))
    assert two.returncode == 0, two.stderr[-3000:]
    one_losses = [line["loss"] for line in ledger(runs / "lora1")]
    assert [line["loss"] for line in ledger(runs / "lora2")] == pytest.approx(one_losses, rel=TOLERANCE)

    # Both adapter folders load in plain peft; compared are the weights each model computes with
    # (adapters merged into the frozen ones, added rows in place): a zero-initialised LoRA B is
    # itself only a few lr steps large.
    merged, adapters = [], []
    for run in ("lora1", "lora2"):
        adapter = runs / run / "adapter"
        adapters.append(load_file(adapter / "adapter_model.safetensors"))
        base = AutoModelForCausalLM.from_pretrained(chain["reference"] / "model")
        merged.append(PeftModel.from_pretrained(base, adapter).merge_and_unload())
    assert any("trainable_tokens_delta" in k for k in adapters[1]) and any("lora_B" in k for k in adapters[1])
    assert adapters[0].keys() == adapters[1].keys()
    assert max_relative_error(merged[0].state_dict(), merged[1].state_dict()) <= TOLERANCE
    before = load_file(chain["reference"] / "model" / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(merged[1].state_dict()["model.embed_tokens.weight"], before)  # the added rows trained


LOADED = re.compile(r"rank (\d+): weights loaded into shards; peak RSS (\d+) MB, (\d+) MB before loading; "
                    r"the model is (\d+) MB, its largest tensor (\d+) MB")
SLACK = 0.05  # of the model: allocator slack, the process group's buffers


def test_no_rank_but_rank_zero_holds_the_whole_model_while_loading(tmp_path_factory):
    """A 50M-parameter model (200 MB in float32, far above the noise of a process's memory) on 2
    processes. While loading, a rank grows by its half of the weights plus the one tensor in flight
    (received whole, then sliced); rank 0 also by the full copy it reads and broadcasts."""
    root = shared_root(tmp_path_factory)
    base = tiny_base(root / "wide-base", hidden_size=1024, intermediate_size=2816)
    run = mio_fit(tiny_args(root, root / "runs" / "wide", *SHARDED, f"--model.backbone={base}",
                            "--data.datasets=[{path: text}]", steps=1, context=64))
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = {int(rank): (float(peak) - float(before), float(model), float(largest))
              for rank, peak, before, model, largest in LOADED.findall(run.stderr)}
    assert sorted(loaded) == [0, 1]
    for rank, (grew, model, largest) in loaded.items():
        print(f"rank {rank}: grew {grew:.0f} MB while loading; the model is {model:.0f} MB, its largest tensor "
              f"{largest:.0f} MB")
        assert model > 150
        assert grew < (model if rank == 0 else 0) + model / 2 + largest + SLACK * model
    assert loaded[1][0] < loaded[1][1]  # rank 1 never held a whole copy
