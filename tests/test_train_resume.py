"""Resume to the sample: a tiny run killed with SIGKILL at a random step and resumed from its last
checkpoint trains on exactly the samples, and with exactly the losses, of an uninterrupted run;
a kill during a checkpoint save leaves the previous checkpoint usable. (SIGTERM on a run of 2
processes, checkpointing at the step boundary and resumed by the printed command to the same
losses: tests/test_train_fsdp2.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from train_support import ledger, shared_root, tiny_args

from mio.train import checkpoint
from mio.train.checkpoint import AtomicCheckpoint, _requeue_slurm_job, find_last, requeued
from mio.train.cli import fit

pytestmark = pytest.mark.slow  # each test trains, kills and resumes a stage

STEPS = 5
# Two row streams (batch of 2 packs), a checkpoint after every step, the sample ledger (a loss for
# every step: logged every step).
def resumable(every: int = 1) -> tuple[str, ...]:
    return ("--data.batch_size=2", "--data.buffer_size=2", "--trainer.log_every_n_steps=1",
            f"--checkpoint.every_n_train_steps={every}", "--trainer.callbacks+=mio.train.callbacks.SampleLedger")


RESUMABLE = resumable()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(root):
    """An uninterrupted run of STEPS steps."""
    out = root / "runs" / "resume-reference"
    fit(tiny_args(root, out, *RESUMABLE, steps=STEPS))
    return out


def test_sigkill_and_resume_loses_and_repeats_no_sample(root, reference, tmp_path):
    run = tmp_path / "killed"
    kill_after = random.Random().randint(1, STEPS - 2)  # the step whose ledger line triggers the kill
    print(f"killing after step {kill_after}")
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mio.train.cli", *tiny_args(root, run, *RESUMABLE, steps=STEPS)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    # The ledger line of a step is written before that step's checkpoint: wait for both.
    while not (_reached(run, kill_after) and (run / "checkpoints" / "last.ckpt").exists()):
        assert proc.poll() is None, f"the run ended before step {kill_after}: see {log.name}"
        assert time.monotonic() < deadline, "the run is too slow"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # possibly in the middle of writing a checkpoint
    proc.wait()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    resumed_from = checkpoint["global_step"]
    assert 1 <= resumed_from < STEPS  # killed mid-run, after at least one checkpoint

    fit(tiny_args(root, run, *RESUMABLE, "--ckpt_path=last", steps=STEPS))
    got, want = ledger(run), ledger(reference)
    assert [line["step"] for line in got] == list(range(1, STEPS + 1))
    # Step for step the same samples, in the same rows: none lost, none seen twice.
    assert [line["keys"] for line in got] == [line["keys"] for line in want]
    # And the same losses after the resume, to the bit: weights, optimizer, schedule and data
    # position all came back.
    assert [line["loss"] for line in got] == [line["loss"] for line in want]


def _reached(run: Path, step: int) -> bool:
    path = run / "ledger" / "rank0.jsonl"
    return path.is_file() and path.read_text().count("\n") >= step


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs."""


def test_a_kill_while_saving_leaves_the_previous_checkpoint(root, tmp_path, monkeypatch):
    real_save = TorchCheckpointIO.save_checkpoint
    saves: list[str] = []

    def dies_on_the_third(self, checkpoint, path, storage_options=None):  # noqa: ANN001
        saves.append(str(path))
        if len(saves) == 3:
            Path(path).write_bytes(b"the first bytes of a checkpoint")
            raise Killed
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dies_on_the_third)
    with pytest.raises(Killed):
        fit(tiny_args(root, tmp_path, *RESUMABLE, steps=5))
    folder = tmp_path / "checkpoints"
    assert saves[2].endswith("step=3.ckpt.partial")  # written under a temporary name
    assert os.readlink(folder / "last.ckpt") == "step=2.ckpt"
    assert find_last(folder) == folder / "step=2.ckpt"
    assert not (folder / "step=3.ckpt").exists()
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and state["MioDataModule"]["micro_batches"] == 2
    assert len(state["mio_rng"]) == 1  # one rank's random state

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", real_save)
    fit(tiny_args(root, tmp_path, *RESUMABLE, "--ckpt_path=last", steps=4))
    assert [line["step"] for line in ledger(tmp_path)] == [1, 2, 3, 4]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=4.ckpt"]  # the partial one is gone


class FolderTrainer:
    """What AtomicCheckpoint uses of a Trainer, writing sharded (folder) checkpoints as FSDP2 does: a
    folder cannot replace another in one rename, so the old one is deleted first."""

    is_global_zero, world_size = True, 1

    def __init__(self, folder: Path, ckpt_path: Path, step: int) -> None:
        self.default_root_dir, self.ckpt_path, self.global_step = str(folder.parent), str(ckpt_path), step
        self.strategy = type("Strategy", (), {"barrier": staticmethod(lambda: None), "cluster_environment": None})()

    def save_checkpoint(self, path, weights_only: bool = False) -> None:  # noqa: ANN001
        Path(path).mkdir()
        (Path(path) / "step").write_text(str(self.global_step))


def test_resuming_an_older_checkpoint_never_leaves_last_naming_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    callback = AtomicCheckpoint(every_n_train_steps=1, dirpath=str(folder), keep_last=3)
    for step in (1, 2, 3):  # an earlier run's sharded checkpoints; `last` names step 3
        callback.save(FolderTrainer(folder, folder / "none", step))
    assert find_last(folder) == folder / "step=3.ckpt"
    real_remove, removed = checkpoint._remove, []

    def remove(path):  # every deletion while the run resumed from step 2 replaces the abandoned step 3
        removed.append(Path(path).name)
        last = find_last(folder)
        assert last is not None and last != Path(path), f"`last` names {last} while {path} is deleted"
        real_remove(path)

    monkeypatch.setattr(checkpoint, "_remove", remove)
    trainer = FolderTrainer(folder, folder / "step=2.ckpt", 2)
    callback.on_train_start(trainer, None)
    trainer.global_step = 3
    callback.save(trainer)
    callback.on_train_end(trainer, None)
    assert "step=3.ckpt" in removed  # replaced by the resumed run's own
    assert find_last(folder) == folder / "step=3.ckpt"


def test_find_last_names_what_last_would_resume_or_none(tmp_path):
    assert find_last(tmp_path / "missing") is None
    assert find_last(tmp_path) is None
    (tmp_path / "step=3.ckpt").write_bytes(b"a checkpoint")
    os.symlink("step=3.ckpt", tmp_path / "last.ckpt")
    assert find_last(tmp_path) == tmp_path / "step=3.ckpt"
    (tmp_path / "step=3.ckpt").unlink()  # a link to a checkpoint that is gone resumes nothing
    assert find_last(tmp_path) is None


def test_slurm_requeue_names_the_job_and_a_requeued_job_resumes(tmp_path, monkeypatch, capsys):
    """The SLURM side of the pre-timeout signal, with a stand-in `scontrol` on PATH."""
    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    _requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    _requeue_slurm_job()
    assert calls.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
    assert "SLURM job 77_3 requeued" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued()
