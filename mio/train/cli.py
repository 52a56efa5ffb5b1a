"""`mio fit`: LightningCLI over the one module and data module; a stage is a YAML file.

Multi-process runs start the same command under ``torchrun`` or ``srun`` (Lightning reads the
ranks from their environment), e.g. ``torchrun --nproc_per_node 8 -m mio.train.cli --config
stages/1_alignment.yaml``.

What mio adds to every stage's config (``--print_config`` shows it, and the stage's saved
``config.yaml`` records it):

- checkpoints: the ``checkpoint:`` group (``mio.train.checkpoint.AtomicCheckpoint``), always on,
  every ``checkpoint.every_n_train_steps`` optimizer steps: by default 1/20 of
  ``trainer.max_steps``; ``trainer.enable_checkpointing: false`` sets it to 0 (only a signal
  writes one); ``checkpoint.monitor: val/loss`` keeps ``best.ckpt`` too;
- loggers, unless ``trainer.logger`` names some: CSV (``<default_root_dir>/logs``, what `mio
  report` reads) and TensorBoard (``<default_root_dir>/tensorboard``);
- Lightning's ``LearningRateMonitor``, so the learning rate is logged with the loss.

A stage that stops on ``model.guard.max_consecutive_skips`` skipped steps in a row, or whose weights
hold a NaN or Inf at the end, exits 3 (mio/train/guard.py); the first case prints the command that
resumes from the last checkpoint past the skipped batches (``data.skip``).

``--ckpt_path last`` resumes the stage from its newest checkpoint, to the sample; with no
checkpoint to resume it is an error naming where mio looked, and a run started without it in a
stage folder that holds checkpoints is refused rather than silently starting over.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mio.log import error, rank_zero_info
from mio.train.checkpoint import AtomicCheckpoint, Interrupted, find_last, requeued, resume_command, skip_ahead_command
from mio.train.data import MioDataModule
from mio.train.guard import NonFiniteWeights, UnstableRun
from mio.train.module import MioModule
from mio.train.sharding import FSDP2Strategy
from mio.userio import MioUserError, run_command

UNSTABLE_EXIT = 3  # a stage that stopped on its own instability (a user error is 2)
CHECKPOINTS_PER_STAGE = 20  # the default interval: trainer.max_steps / 20 optimizer steps
CHECKPOINT = f"{AtomicCheckpoint.__module__}.{AtomicCheckpoint.__qualname__}"
LR_MONITOR = "lightning.pytorch.callbacks.LearningRateMonitor"
CSV_LOGGER, TENSORBOARD_LOGGER = "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"
DESCRIPTION = ("Train one stage: mio fit --config stages/X.yaml [--config OVERLAY.yaml] [--KEY VALUE ...] "
               "[--ckpt_path last]. --print_config shows the resolved stage, mio's additions included.")


PARSER_KEY = re.compile(r'^Parser key "[\w.]+":\s*')  # jsonargparse's prefix of a value error


class ConfigError(MioUserError):
    """A stage configuration that does not parse: the message names the file, the key and a close key."""


def _class_path(entry: Any) -> str:
    return str(entry.get("class_path", "")) if hasattr(entry, "get") else ""


def complete_config(cfg: Namespace) -> Namespace:
    """mio's additions to a parsed stage config (the ``fit`` level: trainer, model, data,
    checkpoint...), in place; applying it twice changes nothing."""
    trainer, checkpoint = cfg.trainer, cfg.checkpoint
    root = Path(trainer.default_root_dir or ".")
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [c for c in [trainer.callbacks] if c]
    if any(_class_path(c) == CHECKPOINT for c in callbacks):
        # A second one would write the same files (and both would answer a signal).
        raise ConfigError(f"trainer.callbacks lists {CHECKPOINT}: mio adds it itself; set its options under "
                          f"`checkpoint:` instead (e.g. --checkpoint.every_n_train_steps=100, --checkpoint.monitor=val/loss)")
    # --- checkpoints: always mio's own (the `checkpoint:` group), never Lightning's ModelCheckpoint
    if trainer.enable_checkpointing is False and checkpoint.every_n_train_steps is None:
        checkpoint.every_n_train_steps = 0  # the user's "no checkpoints": none but a signal's
    if checkpoint.every_n_train_steps is None:
        checkpoint.every_n_train_steps = max(1, (trainer.max_steps or 0) // CHECKPOINTS_PER_STAGE)
    if checkpoint.dirpath is None:
        checkpoint.dirpath = str(root / "checkpoints")
    trainer.enable_checkpointing = False
    # --- loggers: CSV always (next to the stage's outputs), TensorBoard too when installed
    if trainer.logger in (None, True):
        trainer.logger = [Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=str(root), name="logs"))]
        if importlib.util.find_spec("tensorboard") is not None:
            trainer.logger.append(Namespace(class_path=TENSORBOARD_LOGGER,
                                            init_args=Namespace(save_dir=str(root), name="tensorboard")))
    # --- the learning rate, logged beside the loss
    if trainer.logger is not False and not any(_class_path(c) == LR_MONITOR for c in callbacks):
        callbacks.append(Namespace(class_path=LR_MONITOR, init_args=Namespace(logging_interval="step")))
    trainer.callbacks = callbacks
    return cfg


def check_resume(cfg: Namespace) -> None:
    """``--ckpt_path last`` -> the concrete checkpoint, or an error naming where mio looked. A job
    SLURM requeued (the same command again) resumes from ``last`` when there is one. A fresh run
    in a folder holding a previous run's checkpoints is refused."""
    folder = Path(cfg.checkpoint.dirpath)
    last = find_last(folder)
    if cfg.ckpt_path == "last":
        if last is None:
            raise MioUserError(f"--ckpt_path last: no checkpoint to resume in {folder} (no last.ckpt there); this "
                             f"stage has not checkpointed yet, or checkpoint.dirpath / trainer.default_root_dir "
                             f"differ from the run's. Drop --ckpt_path to start the stage from the beginning")
        cfg.ckpt_path = str(last)
    elif cfg.ckpt_path is None and last is not None:
        if not requeued():
            raise MioUserError(f"{folder} holds the checkpoints of an earlier run of this stage (last: {last.name}): "
                             f"add --ckpt_path last to resume it, or delete {folder} (or choose another "
                             f"trainer.default_root_dir) to start it from the beginning")
        cfg.ckpt_path = str(last)
    check_checkpoint_format(cfg)


def check_checkpoint_format(cfg: Namespace) -> None:
    """A sharded checkpoint (a ``torch.distributed.checkpoint`` folder, written under FSDP2) resumes
    only under FSDP2, on any number of processes; said before anything loads."""
    if cfg.ckpt_path is None or not Path(cfg.ckpt_path).is_dir():
        return
    if not _class_path(cfg.trainer.strategy).endswith(f".{FSDP2Strategy.__name__}"):
        raise MioUserError(f"{cfg.ckpt_path} is a sharded checkpoint written under FSDP2: resume it with the FSDP2 "
                         f"strategy (trainer.strategy: mio.train.sharding.FSDP2Strategy, e.g. the overlay "
                         f"stages/tiny/fsdp2.yaml or stages/cluster/fsdp2_7b.yaml), on any number of processes")


class MioArgumentParser(LightningArgumentParser):
    """Shows mio's additions wherever a config is written out: ``--print_config`` and the
    stage's saved ``config.yaml``."""

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if "trainer" in cfg and "checkpoint" in cfg:
            cfg = complete_config(cfg.clone())
        return super().dump(cfg, *args, **kwargs)


class MioCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data pipeline reads the text tokenizer and vocabulary from the model's backbone.
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.extend_vocab", "data.extend_vocab")
        parser.link_arguments("model.location_tokens", "data.location_tokens")
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": None})  # None: from trainer.max_steps
        self.fit_parser = parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(explain(err, list(args or []), known_keys(self.fit_parser))) from None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        complete_config(cfg)
        check_resume(cfg)

    def before_fit(self) -> None:
        # The one place the model and its data meet (each then needs nothing of the other).
        self.model.connect(self.datamodule, stage_dir=self.trainer.default_root_dir)


# --- configuration errors ----------------------------------------------------------------------
def known_keys(parser: LightningArgumentParser) -> list[str]:
    return [k for k in parser.get_defaults().keys() if k != "__path__"]


def explain(err: ArgumentError, argv: list[str], keys: list[str]) -> str:
    """jsonargparse's error -> what went wrong, where (a --config file or the command line) and a
    close key name, without the usage text."""
    text = str(err).strip()
    match = (re.search(r"option '([\w.]+)'", text) or re.search(r'Parser key "([\w.]+)"', text)
             or re.search(r"unrecognized arguments: --([\w.]+)", text))
    if match is None:
        return text
    key = match.group(1)
    where = _source(argv, key)
    if key in keys:  # a setting of the stage, with a value that does not fit it
        return f"in {where}: {key}: {PARSER_KEY.sub('', text)}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"in {where}: {key} is not a setting of a stage" + (f" (did you mean {close[0]}?)" if close else "")


def _source(argv: list[str], key: str) -> str:
    """Where the value of ``key`` that won came from: the last --config file or option setting it."""
    where = "the command line"
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv) and _has_key(argv[i + 1], key):
            where = argv[i + 1]
        elif arg.startswith("--config=") and _has_key(arg.split("=", 1)[1], key):
            where = arg.split("=", 1)[1]
        elif re.match(rf"--{re.escape(key)}([.+=]|$)", arg):
            where = "the command line"
    return where


def _has_key(path: str, key: str) -> bool:
    try:
        node: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# --- entry points --------------------------------------------------------------------------------
def fit(argv: list[str]) -> Path:
    """Run one stage; returns the path of its ``save_pretrained`` folder."""
    try:
        with warnings.catch_warnings():
            # `mio fit` passes its own argv on; LightningCLI would warn that sys.argv differs.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = MioCLI(MioModule, MioDataModule, args=["fit", *argv], seed_everything_default=0,
                         parser_class=MioArgumentParser,
                         parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
                         save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    finally:
        leave_process_group()
    out = cli.model.output_path
    assert out is not None, "training ended without writing the stage's model folder"
    return out


def leave_process_group() -> None:
    """Destroy the process group a distributed stage started (torch asks for it before exit): a
    rank that left with it alive could abort in its threads' destructors while another rank was
    still writing the stage's model folder."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> int:
    return run_command(lambda: _fit_and_print(argv))


def _fit_and_print(argv: list[str]) -> int:
    try:
        out = fit(argv)
    except Interrupted as e:
        rank_zero_info(f"{e}\nresume with: {resume_command(argv)}")
        return e.exit_code
    except UnstableRun as e:
        if int(os.environ.get("RANK", "0")) == 0:
            where = (f"the last checkpoint, {e.checkpoint}, holds good weights (no skipped step changed any)"
                     if e.checkpoint is not None else "the stage has no checkpoint yet")
            error(f"error: {e}.\n{where}; resume from it past these batches with:\n"
                  f"  {skip_ahead_command(argv, e.checkpoint, e.last_step)}\n(or lower model.lr)")
        return UNSTABLE_EXIT
    except NonFiniteWeights as e:
        if int(os.environ.get("RANK", "0")) == 0:
            error(f"error: {e}")
        return UNSTABLE_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


if __name__ == "__main__":
    from mio.noise import quiet

    quiet()
    sys.exit(main(sys.argv[1:]))
