"""The tiny stage with 2 processes on CPU (DDP over gloo, started by torchrun as on a cluster): the
ranks read disjoint samples that together cover the data, their weights are identical after every
step, and the run trains on the same global batches as one process with both rows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from train_support import ledger, shared_root, tiny_args

from mio.train.cli import fit

pytestmark = pytest.mark.slow  # two processes train each case

STEPS = 6
SAMPLES = 24  # image_text: one shard, so every row stream's share is the same in every epoch
COMMON = ("--data.datasets=[{path: image_text}]", "--model.z_loss=1e-3", "--data.buffer_size=1", "--trainer.log_every_n_steps=1",
          "--trainer.callbacks+=mio.train.callbacks.SampleLedger", "--trainer.callbacks.weights_digest=true",
          # validation on 3 packs of the speech-text data every 3 steps (rank 1 of 2 gets one pack and a pad row)
          "--data.val_fraction=0", "--data.val_datasets=[{path: speech_text}]", "--data.val_packs=3",
          "--trainer.val_check_interval=3",
          "--trainer.check_val_every_n_epoch=null")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = shared_root(tmp_path_factory)
    two = root / "runs" / "ddp2"
    args = tiny_args(root, two, *COMMON, "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=1",
                     steps=STEPS)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two cores
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mio.train.cli", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(two / "model")  # printed once, by rank 0
    one = root / "runs" / "ddp1"
    fit(tiny_args(root, one, *COMMON, "--data.batch_size=2", steps=STEPS))
    return [ledger(two, 0), ledger(two, 1)], ledger(one), [val_figures(two), val_figures(one)], \
        [train_figures(two), train_figures(one)]


def val_figures(run) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k.startswith("val/") or k == "step"}
            for row in logged(run) if "val/loss" in row]


def train_figures(run) -> list[dict[str, float]]:
    return [row for row in logged(run) if "train/loss" in row]


def logged(run) -> list[dict[str, float]]:
    import csv

    (path,) = sorted(run.glob("logs/version_*/metrics.csv"))
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def test_ranks_have_identical_weights_after_every_step(runs):
    (r0, r1), *_ = runs
    assert [line["step"] for line in r0] == [line["step"] for line in r1] == list(range(1, STEPS + 1))
    assert [line["weights"] for line in r0] == [line["weights"] for line in r1]
    assert len({line["weights"] for line in r0}) == STEPS  # and they do change


def test_ranks_read_disjoint_samples_covering_the_data(runs):
    (r0, r1), *_ = runs
    seen = [Counter(k for line in r for row in line["keys"] for k in row) for r in (r0, r1)]
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"image_text-{i:04d}" for i in range(SAMPLES)}
    assert sum(sum(c.values()) for c in seen) > SAMPLES  # the run went past the first epoch
    for counts in seen:
        # Epoch after epoch over the rank's share: no sample gets ahead of another by more than
        # the samples held in the packer's one open pack.
        assert max(counts.values()) - min(counts.values()) <= 2


def test_two_processes_train_on_what_one_process_trains_on(runs):
    (r0, r1), one, *_ = runs
    assert [line["keys"] for line in one] == [a["keys"] + b["keys"] for a, b in zip(r0, r1)]
    # The same global token mean: equal losses up to the order of the float sums.
    assert [line["loss"] for line in one] == pytest.approx([line["loss"] for line in r0], rel=1e-5)


def test_validation_gives_the_same_figures_on_one_and_two_processes(runs):
    _, _, (two, one), _ = runs
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 5]
    for a, b in zip(two, one):
        assert set(a) == set(b) and {"val/loss", "val/loss_speech", "val/loss_text"} <= set(a)
        assert a == pytest.approx(b, rel=1e-5, nan_ok=True)


def test_gradient_norm_and_z_loss_are_those_of_one_process(runs):
    """The gradient norm before clipping (a gradient summed over ranks where it should be
    averaged would double it, while AdamW's update would barely change), the z-loss, the logit
    and logsumexp monitors: the same on 2 processes as on 1."""
    *_, (two, one) = runs
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(STEPS))
    for a, b in zip(two, one):
        for key in ("train/grad_norm", "train/z_loss", "train/logit_max", "train/lse_mean", "train/clipped_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
        assert a["train/grad_norm"] > 0 and a["train/z_loss"] > 0
