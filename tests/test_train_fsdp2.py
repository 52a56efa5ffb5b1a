"""FSDP2 (stages/tiny/fsdp2.yaml, mio/train/sharding.py) on CPU with gloo, `mio fit` starting its
second process itself as on a laptop: sharded training equals one unsharded process; distributed
checkpoints resume on another number of processes to the same losses; SIGTERM stops every rank at
one step boundary with a checkpoint; a kill during a save leaves the previous checkpoint; LoRA with
trainable added-token rows trains sharded; no rank but rank 0 holds the whole model while loading.

One stage folder, one chain of runs on the same global batch rows (2 rows per step: 1 per process
under 2 processes), against an uninterrupted unsharded run of 1 process (`reference`):
    2 processes  steps 1..k, until SIGTERM (to rank 0 only) stops both at step k with a checkpoint
    1 process    the printed resume command: from step k (written by 2 processes), steps k+1, k+2,
                 SIGKILLed while writing the checkpoint of step k+2
    2 processes  resumes from `last`, step k+1 (written by 1 process), to the end
The sharded runs recompute each layer in the backward pass (the cluster overlay's setting); the
LoRA runs shard hybrid (a 1 node x 2 processes mesh). The tiny stage's lr is replaced by the full
stages' 3e-5: Adam turns the last-bit differences of a
reduction into steps of up to lr on weights with near-zero gradients, so the tolerance is set by the
lr; an update from a wrong gradient still moves a weight by about lr, 30x the tolerance.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from train_support import ROOT, ledger, shared_root, tiny_args, tiny_base
from transformers import AutoModelForCausalLM

from mio.cli import main
from mio.model.backbone import load_backbone, save_model_folder
from mio.train.checkpoint import find_last
from mio.train.cli import fit

pytestmark = pytest.mark.slow  # two processes train each case

STEPS = 8
TOLERANCE = 1e-5  # relative to each tensor's largest value (weights) or to the loss
SHARDED = ("--config", str(ROOT / "stages" / "tiny" / "fsdp2.yaml"))
ONE_PROCESS = ("--trainer.devices=1", "--data.batch_size=2")  # the 2 rows of a step in one process
COMMON = ("--model.lr=3e-5", "--data.datasets=[{path: image_text}, {path: speech_text}]", "--data.buffer_size=2",
          "--trainer.log_every_n_steps=1", "--checkpoint.every_n_train_steps=1",
          f"--checkpoint.keep_last={STEPS}", "--trainer.callbacks+=mio.train.callbacks.SampleLedger")
LORA = ("--model.lora.rank=4", "--model.lora.alpha=8", "--model.lora.dropout=0.0", "--model.lora.train_new_tokens=true")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two cores

# `mio fit` whose every rank dies (SIGKILL) right after writing its part of the Nth checkpoint,
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
                          timeout=600)


@contextmanager
def one_thread():
    """In-process runs compute like the 1-thread processes they are compared with: Adam turns the
    last-bit differences between thread counts into lr-sized steps on near-zero gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    path, deadline = run / "ledger" / "rank0.jsonl", time.monotonic() + 300
    while not (path.is_file() and path.read_text().count("\n") >= step):
        assert proc.poll() is None, f"the run ended before step {step}: see {log}"
        assert time.monotonic() < deadline, "the run is too slow"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = shared_root(tmp_path_factory)
    reference, run = root / "runs" / "fsdp2-reference", root / "runs" / "fsdp2-chain"
    with one_thread():
        fit(tiny_args(root, reference, *COMMON, *ONE_PROCESS, steps=STEPS))
    facts: dict = {"root": root, "reference": reference, "run": run}

    # 2 processes, stopped by SIGTERM sent to rank 0 alone once step 1 is done.
    log = run.parent / "fsdp2-sigterm.log"
    with log.open("w") as out:
        # Each layer recomputed in the backward pass: the cluster overlay's setting.
        args = tiny_args(root, run, *SHARDED, *COMMON, "--model.gradient_checkpointing=true", steps=STEPS)
        proc = subprocess.Popen([sys.executable, "-m", "mio.train.cli", *args],
                                env=ENV, stdout=out, stderr=subprocess.STDOUT)
        wait_for_step(run, 1, proc, log)
        proc.send_signal(signal.SIGTERM)
        facts["sigterm_exit"] = proc.wait(timeout=300)
    facts["sigterm_log"] = log.read_text()
    facts["stopped"] = k = torch.load(find_last(run / "checkpoints") / "meta.pt", weights_only=True)["global_step"]
    facts["model_after_sigterm"] = (run / "model").exists()
    assert 2 <= k <= STEPS - 2, facts["sigterm_log"][-3000:]

    # 1 process: the printed resume command, killed while saving its second checkpoint.
    command = shlex.split(facts["sigterm_log"].split("resume with: ")[1].splitlines()[0])
    script = run.parent / "killed_while_saving.py"
    script.write_text(KILLED_WHILE_SAVING)
    facts["command"] = command
    killed = mio_fit([*command[2:], *ONE_PROCESS], script=str(script), env=dict(ENV, KILL_AT_SAVE="2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    facts["after_kill"] = sorted(p.name for p in (run / "checkpoints").iterdir())
    facts["last_after_kill"] = find_last(run / "checkpoints")

    # 2 processes again, from `last`, to the end.
    resumed = mio_fit(command[2:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return facts


def test_sigterm_to_one_rank_stops_both_at_a_step_boundary_with_a_checkpoint(chain):
    k = chain["stopped"]
    assert chain["sigterm_exit"] == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM after step {k}" in chain["sigterm_log"]
    assert chain["command"][:2] == ["mio", "fit"] and chain["command"][-2:] == ["--ckpt_path", "last"]
    assert not chain["model_after_sigterm"]  # an unfinished stage writes no model folder
    # Both ranks stopped after step k: each one's ledger ended there.
    run = chain["run"]
    assert [line["step"] for line in ledger(run, 1) if line["step"] <= k] == list(range(1, k + 1))


def test_a_kill_while_saving_leaves_the_previous_sharded_checkpoint(chain):
    k, folder = chain["stopped"], chain["run"] / "checkpoints"
    assert chain["last_after_kill"] == folder / f"step={k + 1}.ckpt"
    assert f"step={k + 2}.ckpt.partial" in chain["after_kill"]  # written, never renamed into place
    assert f"step={k + 2}.ckpt" not in chain["after_kill"]
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())  # the resumed run cleared it
    # A torch.distributed.checkpoint folder: one file of shards per rank that wrote it.
    assert sorted(p.name for p in (folder / f"step={k}.ckpt").iterdir()) == [".metadata", "__0_0.distcp",
                                                                            "__1_0.distcp", "meta.pt"]
    meta = torch.load(folder / f"step={k}.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == k and meta["MioDataModule"]["micro_batches"] == k
    assert len(meta["mio_rng"]) == 2  # every rank's random state


def test_a_sharded_checkpoint_resumed_without_fsdp2_is_a_clear_error(chain, capsys):
    run = chain["run"]
    args = tiny_args(chain["root"], run, *COMMON, *ONE_PROCESS, "--ckpt_path=last", steps=STEPS)
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert f"{find_last(run / 'checkpoints')} is a sharded checkpoint written under FSDP2" in err
    assert "mio.train.sharding.FSDP2Strategy" in err


def test_sharded_runs_train_what_one_process_trains_across_world_sizes(chain):
    reference, run = ledger(chain["reference"]), chain["run"]
    assert [line["step"] for line in reference] == list(range(1, STEPS + 1))
    assert len({line["loss"] for line in reference}) == STEPS  # training moves the loss
    rank0, rank1 = ledger(run, 0), {line["step"]: line for line in ledger(run, 1)}
    assert [line["step"] for line in rank0] == list(range(1, STEPS + 1))
    k = chain["stopped"]
    assert sorted(rank1) == [s for s in range(1, STEPS + 1) if not k < s <= k + 1]  # step k+1 ran in 1 process
    for line, want in zip(rank0, reference):
        # The same rows (one per process under two processes) and the same global loss.
        rows = line["keys"] + (rank1[line["step"]]["keys"] if line["step"] in rank1 else [])
        assert rows == want["keys"], line["step"]
        assert line["loss"] == pytest.approx(want["loss"], rel=TOLERANCE), line["step"]
    weights = [load_file(folder / "model" / "model.safetensors") for folder in (chain["reference"], run)]
    assert max_relative_error(*weights) <= TOLERANCE


def test_sharded_gradient_norm_is_that_of_one_process(chain):
    """The gradient norm before clipping, over DTensor shards, equals one process's (the step
    that ran in one process between the kill and the resume aside); a gradient summed over ranks
    where it should be averaged would be 2x. Measured: within 1e-7."""
    from mio.report import read_metrics

    k = chain["stopped"]
    want = {r["step"]: r["train/grad_norm"] for r in read_metrics(chain["reference"]) if "train/grad_norm" in r}
    got = {r["step"]: r["train/grad_norm"] for r in read_metrics(chain["run"]) if "train/grad_norm" in r}
    sharded = [s for s in range(STEPS) if s != k]  # logged 0-based: step k+1 is row k
    assert set(sharded) <= set(got) and sorted(want) == list(range(STEPS))
    for step in sharded:
        assert got[step] == pytest.approx(want[step], rel=TOLERANCE), step


def test_sharded_stage_output_loads_in_vanilla_transformers_with_equal_logits(chain):
    ids = torch.tensor([[1, 5, 9, 300, 310, 4000, 12000, 12500, 7]])
    logits = []
    for folder in (chain["reference"], chain["run"]):  # the second gathered from 2 processes' shards
        model, info = AutoModelForCausalLM.from_pretrained(folder / "model", output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched weights
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


LOADED = re.compile(r"rank (\d+): weights loaded into shards; peak RSS (\d+) MB, (\d+) MB before loading; "
                    r"the model is (\d+) MB, its largest tensor (\d+) MB")
# Besides its shard, a rank holds a tensor in flight while loading: received whole, sliced, plus
# the transport's copy (2 x the largest tensor), and allocator slack (15% of the model).
SLACK = 0.15


def test_lora_with_trainable_added_rows_trains_sharded_as_in_one_process_loading_no_whole_copy(tmp_path_factory):
    """LoRA on a 28M-parameter backbone (float32: 110 MB; 200 MB with the added rows' copies peft
    keeps; far above the noise of a process's memory, its largest tensor an eighth of it): 2
    processes under FSDP2 train what 1 process trains, the adapter folders load in plain peft, and
    while loading, rank 1 grows by its share plus the tensor in flight, rank 0 by that and the whole
    model it reads and broadcasts."""
    root = shared_root(tmp_path_factory)
    runs = root / "runs"
    base = tiny_base(root / "wide-base", hidden_size=512, intermediate_size=4096)
    model, tokenizer, table = load_backbone(base, extend=True)
    extended = save_model_folder(model, tokenizer, table, root / "wide-extended")  # as a stage writes it
    args = (f"--model.backbone={extended}", "--model.extend_vocab=false", "--data.datasets=[{path: image_text}]",
            "--model.lr=3e-5", *LORA, "--trainer.log_every_n_steps=1",
            "--trainer.callbacks+=mio.train.callbacks.SampleLedger")
    with one_thread():
        fit(tiny_args(root, runs / "lora1", *args, *ONE_PROCESS, steps=3, context=128))
    # Hybrid sharding: a (1 node x 2 processes) mesh, replicas across nodes, shards within one.
    two = mio_fit(tiny_args(root, runs / "lora2", *args, *SHARDED, "--trainer.strategy.init_args.hybrid=true", steps=3,
                            context=128))
    assert two.returncode == 0, two.stderr[-3000:]
    one_losses = [line["loss"] for line in ledger(runs / "lora1")]
    assert [line["loss"] for line in ledger(runs / "lora2")] == pytest.approx(one_losses, rel=TOLERANCE)

    # Both adapter folders load in plain peft; compared are the weights each model computes with
    # (adapters merged into the frozen ones, added rows in place): a zero-initialised LoRA B is
    # itself only a few lr steps large.
    merged, adapters = [], []
    for run in ("lora1", "lora2"):
        adapters.append(load_file(runs / run / "adapter" / "adapter_model.safetensors"))
        frozen = AutoModelForCausalLM.from_pretrained(extended)
        merged.append(PeftModel.from_pretrained(frozen, runs / run / "adapter").merge_and_unload().state_dict())
    assert adapters[0].keys() == adapters[1].keys()
    assert any("trainable_tokens_delta" in k for k in adapters[1]) and any("lora_B" in k for k in adapters[1])
    assert max_relative_error(merged[0], merged[1]) <= TOLERANCE
    before = load_file(extended / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(merged[1]["model.embed_tokens.weight"], before)  # the added rows trained

    loaded = {int(rank): (float(peak) - float(start), float(size), float(largest))
              for rank, peak, start, size, largest in LOADED.findall(two.stderr)}
    assert sorted(loaded) == [0, 1]
    for rank, (grew, size, largest) in loaded.items():
        print(f"rank {rank}: grew {grew:.0f} MB while loading; the model is {size:.0f} MB, its largest tensor "
              f"{largest:.0f} MB")
        assert size > 150 and largest < size / 5
        assert grew < (size if rank == 0 else 0) + size / 2 + 2 * largest + SLACK * size
    assert loaded[1][0] < loaded[1][1]  # rank 1 never held a whole copy


@pytest.mark.gpu
def test_bf16_fsdp2_on_one_gpu_checkpoints_resumes_and_exports(tmp_path_factory):
    """The cluster overlay's settings on one GPU: bf16 compute with fp32 master weights and
    reduction, layers recomputed, a distributed checkpoint per step; a resume from step 2 repeats
    steps 3-4 of the uninterrupted run (to bf16 kernels' run-to-run noise), and the output folder
    is a plain float32 model."""
    root = shared_root(tmp_path_factory)
    gpu = ("--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
           "--trainer.strategy.init_args.param_dtype=bfloat16", "--model.gradient_checkpointing=true",
           "--data.batch_size=2")
    whole, resumed = root / "runs" / "fsdp2-gpu", root / "runs" / "fsdp2-gpu-resumed"
    first = mio_fit(tiny_args(root, whole, *SHARDED, *COMMON, *gpu, steps=4))
    assert first.returncode == 0, first.stderr[-3000:]
    again = mio_fit(tiny_args(root, resumed, *SHARDED, *COMMON, *gpu,
                              f"--ckpt_path={whole / 'checkpoints' / 'step=2.ckpt'}", steps=4))
    assert again.returncode == 0, again.stderr[-3000:]
    want = {line["step"]: line["loss"] for line in ledger(whole)}
    assert [line["step"] for line in ledger(resumed)] == [3, 4]
    assert [line["loss"] for line in ledger(resumed)] == pytest.approx([want[3], want[4]], rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(whole / "model")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
