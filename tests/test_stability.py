"""Long runs that survive their own instabilities (mio/train/guard.py, z-loss in
mio/train/loss.py, the monitors of MioModule): each checked against a computation made apart
from the training code -- the z-loss from vanilla transformers' logits sample by sample, a
skipped step by the weights' digests and the batches' keys, the skip-ahead resume by the data
module's own batch order."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import ROOT, ledger, shared_root, tiny_args

from mio.data.reading import DatasetSpec
from mio.train.checkpoint import skip_ahead_command
from mio.train.cli import fit, main
from mio.train.data import MioDataModule
from mio.train.guard import SKIPS_FILE, Guard, GuardSettings, NonFiniteWeights, SkippedStep, UnstableRun, check_finite_weights
from mio.train.module import MioModule, gradient_norm

DATASETS = ("--data.datasets=[{path: image_text}, {path: speech_text}]", "--data.val_fraction=0",
            "--trainer.log_every_n_steps=1")
LEDGER = ("--trainer.callbacks+=mio.train.callbacks.SampleLedger", "--trainer.callbacks.weights_digest=true")
Z = 1e-3

# `mio fit` whose training_step returns a NaN loss at the global steps in $POISON_STEPS (0-based, the
# steps done before it) on the rank $POISON_RANK only: its gradients are NaN, and under DDP so
# are every rank's after the all-reduce.
POISONED = """
import os, runpy
from mio.train.module import MioModule, gradient_norm
real = MioModule.training_step
steps = {int(s) for s in os.environ["POISON_STEPS"].split(",")}
def poisoned(self, batch, batch_idx):
    loss = real(self, batch, batch_idx)
    if self.trainer.global_step in steps and self.trainer.global_rank == int(os.environ.get("POISON_RANK", "0")):
        loss = loss * float("nan")
    return loss
MioModule.training_step = poisoned
runpy.run_module("mio.train.cli", run_name="__main__")
"""


def metrics(run: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        with open(path) as fh:
            rows += [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    return [r for r in rows if "train/loss" in r]


def poison(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The in-process form of POISONED."""
    real = MioModule.training_step

    def poisoned(self, batch, batch_idx):  # noqa: ANN001, ANN202
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in steps else loss

    monkeypatch.setattr(MioModule, "training_step", poisoned)


def stage_batches(root: Path, n: int, pack: bool = True) -> list[dict]:
    """The first ``n`` micro-batches of the stage, from the data module alone (one process)."""
    dm = MioDataModule([DatasetSpec("image_text"), DatasetSpec("speech_text")], root=str(root / "data"),
                       context_length=256, batch_size=2, buffer_size=4, backbone=str(root / "base"),
                       extend_vocab=True, pack=pack)
    dm.setup("fit")
    return [b for _, b in zip(range(n), dm.train_dataloader())]


# --- z-loss -----------------------------------------------------------------------------------
def independent_z_loss(model: torch.nn.Module, batch: dict, weight: float) -> float:
    """weight x mean over the supervised targets of logsumexp(logits)^2, each sample of each row
    scored alone by the plain model (its logit at t predicts its label at t+1)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(batch["input_ids"].shape[0]):
            docs = batch["document_ids"][r]
            for d in sorted(set(docs.tolist()) - {-1}):
                ids, labels = batch["input_ids"][r][docs == d], batch["labels"][r][docs == d]
                logits = model(input_ids=ids[None]).logits[0].double()  # (l, V)
                lse = torch.logsumexp(logits[:-1], dim=-1)
                kept = labels[1:] != -100
                total += float(lse[kept].square().sum())
                count += int(kept.sum())
    assert count == int((batch["labels"][:, 1:] != -100).sum())  # no target crosses two samples
    return weight * total / count


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False])
def test_z_loss_is_the_mean_square_logsumexp_over_the_shifted_supervised_positions(tmp_path_factory, tmp_path, pack):
    root = shared_root(tmp_path_factory)
    fit(tiny_args(root, tmp_path, *DATASETS, *LEDGER, f"--model.z_loss={Z}", f"--data.pack={str(pack).lower()}",
                  steps=1))
    logged = metrics(tmp_path)[0]["train/z_loss"]  # the first step: the weights before any update
    batch = stage_batches(root, 1, pack)[0]
    assert ledger(tmp_path)[0]["keys"] == batch["keys"]  # the batch the stage trained on
    torch.manual_seed(0)  # the run's seed: the added rows as the stage drew them
    module = MioModule(str(root / "base"), extend_vocab=True)
    module.load_weights()
    assert logged == pytest.approx(independent_z_loss(module.model.eval(), batch, Z), rel=1e-5)


def test_logsumexp_from_the_cross_entropy_has_logsumexps_value_and_gradient():
    """lse = ce + logit[target]: torch.logsumexp's value and gradient (the softmax), bf16 logits included."""
    from mio.train.loss import token_cross_entropy, token_logsumexp

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(64, 500, generator=g) * 8).to(dtype).requires_grad_()
        targets = torch.randint(0, 500, (64,), generator=g)
        wide = logits.float()  # the one float32 copy MioModule.token_losses makes
        ours = token_logsumexp(wide, targets, token_cross_entropy(wide, targets))
        (ours_grad,) = torch.autograd.grad(ours.square().sum(), logits)
        theirs = torch.logsumexp(logits.float(), dim=-1)
        (theirs_grad,) = torch.autograd.grad(theirs.square().sum(), logits)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-5)  # bf16: the same roundings


@pytest.mark.slow
def test_z_loss_weight_zero_leaves_the_loss_bitwise_unchanged(tmp_path_factory):
    """training_step's loss at weight 0 is bitwise the cross-entropy token mean it was before
    z-loss existed; at weight w it is that plus w x the mean square logsumexp (from the logits
    computed apart), and the monitors' copy of the logsumexp carries no gradient."""
    from types import SimpleNamespace

    from mio.train.loss import micro_batch_loss, supervised_targets, token_cross_entropy

    root = shared_root(tmp_path_factory)
    batch = stage_batches(root, 1)[0]
    labels = batch["labels"]
    losses = {}
    for weight in (0.0, Z):
        torch.manual_seed(0)
        module = MioModule(str(root / "base"), extend_vocab=True, z_loss=weight)
        module.load_weights()
        module.trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, log_every_n_steps=1,
                                         global_step=0)  # what training_step reads
        losses[weight] = module.training_step(batch, 0)
        logits = module(batch).logits.detach()  # (N, V)
        count = (labels[:, 1:] != -100).sum()
        before = micro_batch_loss(token_cross_entropy(logits, supervised_targets(labels)), count)
        square = torch.logsumexp(logits.double(), dim=-1).square().mean()
    assert torch.equal(losses[0.0].detach(), before)
    assert float((losses[Z] - losses[0.0]).detach()) == pytest.approx(Z * float(square), rel=1e-4)
    scored = module.token_losses(batch, monitors=True)
    assert scored.lse.requires_grad  # under z-loss: the term's gradient flows
    module.z_loss = 0.0
    assert not module.token_losses(batch, monitors=True).lse.requires_grad


# --- the guard ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4096, 2048), (64, 8, 512), (30000,), ()])
def test_gradient_norm_is_the_float64_norm_of_all_gradients(shape):
    """Against the norm of every gradient's elements together in float64. torch's own float32
    norm of the (4096, 2048) gradient is about 1e-3 off on CPU (one float32 accumulator), which is
    why the monitor reduces row by row."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(torch.zeros(3, 5)),
              torch.nn.Parameter(torch.zeros(2))]  # the last without a gradient
    for p in params[:2]:
        p.grad = torch.randn(p.shape) * torch.rand(p.shape) ** 4  # uneven, as real gradients
    want = torch.cat([p.grad.double().flatten() for p in params[:2]]).norm()
    got = gradient_norm(params)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(float(want), rel=1e-6)  # measured: 4e-8
    assert gradient_norm([torch.nn.Parameter(torch.zeros(2))]) is None


def test_guard_judges_non_finite_figures_and_spikes_over_the_running_median(tmp_path):
    guard = Guard(GuardSettings(spike_factor=2.0, spike_window=3, max_consecutive_skips=2), tmp_path, writer=True)
    assert guard.judge(float("nan"), 1.0) == "non-finite loss"
    assert guard.judge(1.0, float("inf")) == "non-finite gradient norm"
    assert guard.judge(100.0, 1.0) is None  # no spike check before the window is full
    for loss in (3.0, 1.0, 2.0):
        guard.keep(loss)
    assert guard.judge(3.9, 1.0) is None and guard.judge(4.1, 1.0).startswith("loss spike")  # median 2
    guard.skip(SkippedStep(5, "non-finite loss", float("nan"), 1.0, [["a-1"]]))
    guard.keep(2.0)  # a kept step ends the run of skips
    guard.skip(SkippedStep(7, "non-finite loss", float("nan"), 1.0, [["a-2"]]))
    with pytest.raises(UnstableRun, match=r"2 optimizer steps in a row were skipped \(steps 7-8"):
        guard.skip(SkippedStep(8, "non-finite gradient norm", 1.0, float("nan"), [["a-3"]]))
    lines = [json.loads(line) for line in (tmp_path / SKIPS_FILE).read_text().splitlines()]
    assert [(line["step"], line["keys"]) for line in lines] == [(5, [["a-1"]]), (7, [["a-2"]]), (8, [["a-3"]])]
    assert guard.skipped == 3
    sft = GuardSettings()
    assert sft.enabled and sft.spike_factor is None  # off by default: SFT sets nothing


def test_the_skip_ahead_command_resumes_past_the_skipped_batches():
    argv = ["--config", "s.yaml", "--ckpt_path", "last", "--data.skip.at_step=3", "--data.skip.batches=2"]
    command = shlex.split(skip_ahead_command(argv, Path("/r/checkpoints/step=40.ckpt"), 47))
    assert command == ["mio", "fit", "--config", "s.yaml", "--ckpt_path", "/r/checkpoints/step=40.ckpt",
                       "--data.skip.at_step=40", "--data.skip.batches=7"]
    assert shlex.split(skip_ahead_command([], None, 5))[-2:] == ["--data.skip.at_step=0", "--data.skip.batches=5"]


def test_a_model_folder_is_never_written_with_a_nan(tmp_path):
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([1])}
    with pytest.raises(NonFiniteWeights, match=r"1 of the stage's 3 weight tensors hold NaN or Inf \(b\).*was not written"):
        check_finite_weights(state, tmp_path / "model")
    check_finite_weights({"a": torch.ones(3)}, tmp_path / "model")


@pytest.mark.slow
def test_a_diverged_stage_without_the_guard_writes_no_model_folder(tmp_path_factory, tmp_path, monkeypatch, capsys):
    root = shared_root(tmp_path_factory)
    poison(monkeypatch, {1})  # NaN gradients at step 2 reach the weights: the guard is off
    assert main(tiny_args(root, tmp_path, *DATASETS, "--model.guard.enabled=false", steps=3)) == 3
    assert "hold NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_consecutive_skips_stop_the_stage_and_its_command_resumes_exactly_past_them(tmp_path_factory, tmp_path,
                                                                                    monkeypatch, capsys):
    """Steps 3 and 4 are NaN (2 skips in a row allowed): the stage stops at step 4 naming the
    checkpoint of step 3; the command it prints resumes there, skipping batch 4, and trains on
    batches 5, 6, 7 as steps 4, 5, 6."""
    root = shared_root(tmp_path_factory)
    args = tiny_args(root, tmp_path, *DATASETS, *LEDGER, "--model.guard.max_consecutive_skips=2",
                     "--checkpoint.every_n_train_steps=1", "--checkpoint.keep_last=10", steps=6)
    with monkeypatch.context() as patched:
        poison(patched, {2, 3})
        assert main(args) == 3
    err = capsys.readouterr().err
    assert "2 optimizer steps in a row were skipped (steps 3-4: non-finite gradient norm" in err
    assert f"the last checkpoint, {tmp_path / 'checkpoints' / 'step=3.ckpt'}, holds good weights" in err
    command = shlex.split(err.split("past these batches with:\n[mio]   ")[1].splitlines()[0])
    assert command[-2:] == ["--data.skip.at_step=3", "--data.skip.batches=1"]
    assert not (tmp_path / "model").exists()

    batches = [b["keys"] for b in stage_batches(root, 7)]
    skipped = [json.loads(line) for line in (tmp_path / SKIPS_FILE).read_text().splitlines()]
    assert [(s["step"], s["keys"]) for s in skipped] == [(3, batches[2]), (4, batches[3])]
    before = ledger(tmp_path)
    assert [line["keys"] for line in before] == batches[:3]
    assert before[2]["weights"] == before[1]["weights"]  # the skipped step 3 changed no weight

    fit(command[2:])
    after = ledger(tmp_path)
    assert [line["step"] for line in after] == [1, 2, 3, 4, 5, 6]
    assert [line["keys"] for line in after[3:]] == batches[4:7]
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_non_finite_step_on_one_rank_is_skipped_on_both(tmp_path_factory, strategy):
    """Two processes (DDP under torchrun; FSDP2 started by Lightning): rank 1's loss is NaN at
    step 3. Both ranks skip it -- their weights (FSDP2: their shards) after it are those before it
    -- and the skips file names the rows of both."""
    root = shared_root(tmp_path_factory)
    run = root / "runs" / f"poisoned-{strategy}"
    script = root / "runs" / "poisoned.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(POISONED)
    args = tiny_args(root, run, "--data.datasets=[{path: image_text}]", "--data.val_fraction=0",
                     "--trainer.log_every_n_steps=1", *LEDGER, steps=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", POISON_STEPS="2", POISON_RANK="1")
    if strategy == "ddp":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                   *args, "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=1"]
    else:
        command = [sys.executable, str(script), *args, "--config", str(ROOT / "stages" / "tiny" / "fsdp2.yaml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [ledger(run, 0), ledger(run, 1)]
    for lines in ranks:
        digests = [line["weights"] for line in lines]
        assert digests[2] == digests[1]  # step 3 kept out of the weights
        assert len(set(digests)) == 4  # every other step moved them
    if strategy == "ddp":
        assert ranks[0][2]["weights"] == ranks[1][2]["weights"]
    (skip,) = [json.loads(line) for line in (run / SKIPS_FILE).read_text().splitlines()]
    assert skip["step"] == 3 and skip["reason"] == "non-finite gradient norm"
    assert skip["keys"] == ranks[0][2]["keys"] + ranks[1][2]["keys"]
    assert [r["train/skipped_steps"] for r in metrics(run)] == [0, 0, 1, 1, 1]


def test_mio_report_plots_the_monitors(tmp_path, capsys):
    from mio.report import find_stages, stage_figures

    monitors = {"train/grad_norm": [3.0, 0.5, 2.0], "train/clipped_fraction": [1.0, 0.0, 1.0],
                "train/logit_max": [12.0, 30.0, 20.0], "train/lse_mean": [9.0, 8.0, 7.0],
                "train/lse_mean_text": [9.5, 8.5, 7.5], "train/z_loss": [1e-3, 9e-4, 8e-4],
                "train/skipped_steps": [0.0, 1.0, 1.0]}
    folder = tmp_path / "stage" / "logs" / "version_0"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["step", "train/loss", *monitors])
        writer.writeheader()
        writer.writerows({"step": s, "train/loss": 5.0 - s, **{k: v[s] for k, v in monitors.items()}} for s in range(3))
    (stage,) = find_stages([tmp_path / "stage"])
    figures = stage_figures(stage)
    assert figures["steps clipped"] == pytest.approx(2 / 3) and figures["max logit"] == 30.0
    assert figures["skipped steps"] == 1.0
    from mio.cli import main as mio_main

    assert mio_main(["report", str(tmp_path / "stage")]) == 0
    page = (tmp_path / "stage" / "report.html").read_text()
    for title in ("Gradient norm before clipping", "Share of steps clipped", "Largest |logit|",
                  "Mean logsumexp of the logits, per target modality", "z-loss", "Skipped steps"):
        assert f"<h2>{title}" in page
