"""`mio fit`'s additions to a stage: checkpoints always on at an interval that fits the stage (one
setting changes it, `enable_checkpointing: false` turns it off without a crash), the loggers and
the learning-rate monitor, all shown by `--print_config`; and a resume that can never silently
restart: `--ckpt_path last` with nothing to resume is an error naming where mio looked, a fresh
run over a previous run's checkpoints is refused."""

from __future__ import annotations

import csv

import pytest
import yaml
from train_support import ROOT, shared_root, tiny_args

from mio.cli import main
from mio.train.checkpoint import find_last
from mio.train.cli import fit

pytestmark = pytest.mark.slow  # each test trains a stage


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


def printed_config(capsys, *args: str) -> dict:  # noqa: ANN001
    with pytest.raises(SystemExit) as done:
        fit(["--config", str(ROOT / "stages" / "tiny" / "1_alignment.yaml"), *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_checkpoints_loggers_and_callbacks_mio_adds(capsys, tmp_path):
    cfg = printed_config(capsys, f"--trainer.default_root_dir={tmp_path}")
    assert cfg["checkpoint"]["every_n_train_steps"] == 200 // 20  # the tiny stage's 200 steps / 20
    assert cfg["checkpoint"]["dirpath"] == str(tmp_path / "checkpoints")
    loggers = {logger["class_path"]: logger["init_args"] for logger in cfg["trainer"]["logger"]}
    assert loggers["lightning.pytorch.loggers.CSVLogger"] == {"save_dir": str(tmp_path), "name": "logs"}
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert callbacks == ["mio.train.callbacks.StepLog", "lightning.pytorch.callbacks.LearningRateMonitor"]
    # The interval follows the stage's length unless set; one setting sets it.
    assert printed_config(capsys, "--trainer.max_steps=4")["checkpoint"]["every_n_train_steps"] == 1
    assert printed_config(capsys, "--trainer.max_steps=1000")["checkpoint"]["every_n_train_steps"] == 50
    assert printed_config(capsys, "--checkpoint.every_n_train_steps=7")["checkpoint"]["every_n_train_steps"] == 7
    assert printed_config(capsys, "--trainer.enable_checkpointing=false")["checkpoint"]["every_n_train_steps"] == 0


def test_checkpoint_callback_listed_by_hand_is_pointed_to_the_setting(root, tmp_path, capsys):
    args = tiny_args(root, tmp_path, "--trainer.callbacks+=mio.train.checkpoint.AtomicCheckpoint")
    assert main(["fit", *args]) == 2
    assert "set its options under `checkpoint:`" in capsys.readouterr().err
    # Keeping the best checkpoint by a metric is a setting of the same callback.
    assert printed_config(capsys, "--checkpoint.monitor=val/loss")["checkpoint"]["monitor"] == "val/loss"


def test_no_checkpoints_when_turned_off_and_no_crash(root, tmp_path):
    fit(tiny_args(root, tmp_path, "--trainer.enable_checkpointing=false", steps=1))
    assert find_last(tmp_path / "checkpoints") is None and (tmp_path / "model" / "config.json").is_file()


def test_resume_can_never_silently_restart(root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", *tiny_args(root, run, "--ckpt_path=last")]) == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path last: no checkpoint to resume in {run / 'checkpoints'}" in err
    assert not (run / "model").exists() and not (run / "logs").exists()  # nothing trained, nothing overwritten

    fit(tiny_args(root, run, "--trainer.log_every_n_steps=1", steps=2))  # checkpoints by default: 2 // 20 -> every step
    assert find_last(run / "checkpoints").name == "step=2.ckpt"
    assert main(["fit", *tiny_args(root, run, steps=2)]) == 2  # the same command again, without --ckpt_path
    assert "add --ckpt_path last to resume it" in capsys.readouterr().err
    assert find_last(run / "checkpoints").name == "step=2.ckpt"  # untouched

    fit(tiny_args(root, run, "--trainer.log_every_n_steps=1", "--ckpt_path=last", steps=3))
    assert find_last(run / "checkpoints").name == "step=3.ckpt"
    # The resumed run logged only its own step, in a log version of its own; the learning rate too.
    resumed = list(csv.DictReader((run / "logs" / "version_1" / "metrics.csv").open()))
    assert {r["step"] for r in resumed if r["train/loss"]} == {"2"}
    assert [float(r["lr-AdamW/pg1"]) for r in resumed if r["lr-AdamW/pg1"]][0] > 0
