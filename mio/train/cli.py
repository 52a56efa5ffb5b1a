"""`mio fit`: LightningCLI over the one module and data module; a stage is a YAML file.

Multi-process runs start the same command under ``torchrun`` or ``srun`` (Lightning reads the
ranks from their environment), e.g. ``torchrun --nproc_per_node 8 -m mio.train.cli --config
stages/1_alignment.yaml``. ``--ckpt_path last`` resumes the stage from its newest checkpoint (or
starts it when there is none yet), to the sample.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from mio.train.checkpoint import Interrupted, find_last, requeued, resume_command
from mio.train.data import MioDataModule
from mio.train.module import MioModule

CHECKPOINT_CLASSES = ("ModelCheckpoint", "AtomicCheckpoint")


class MioCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        # The data pipeline reads the text tokenizer and vocabulary from the model's backbone.
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.extend_vocab", "data.extend_vocab")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        root = trainer.default_root_dir or "."
        if trainer.logger in (None, True):
            # CSV always (next to the stage's outputs), TensorBoard too when it is installed.
            trainer.logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": root, "name": "logs"}}]
            if importlib.util.find_spec("tensorboard") is not None:
                trainer.logger.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                       "init_args": {"save_dir": root, "name": "tensorboard"}})
        callbacks = trainer.callbacks or []
        has_checkpoint = any(str(c.get("class_path", "")).endswith(CHECKPOINT_CLASSES) for c in callbacks
                             if hasattr(c, "get"))
        if trainer.enable_checkpointing is not False and not has_checkpoint:
            # Resumable by default: atomic checkpoints that hold the data position.
            trainer.callbacks = [*callbacks, {"class_path": "mio.train.checkpoint.AtomicCheckpoint"}]
        trainer.enable_checkpointing = False  # Lightning's own ModelCheckpoint stays off beside mio's
        # `last` (or a SLURM requeue, which restarts the same command): the newest checkpoint, if any.
        if cfg.ckpt_path == "last" or (cfg.ckpt_path is None and requeued()):
            last = find_last(Path(root) / "checkpoints")
            cfg.ckpt_path = str(last) if last is not None else None


def fit(argv: list[str]) -> Path:
    """Run one stage; returns the path of its ``save_pretrained`` folder."""
    with warnings.catch_warnings():
        # `mio fit` passes its own argv on; LightningCLI would warn that sys.argv differs.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = MioCLI(MioModule, MioDataModule, args=["fit", *argv], seed_everything_default=0,
                     save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    out = cli.model.output_path
    assert out is not None, "training ended without writing the stage's model folder"
    return out


def main(argv: list[str]) -> int:
    try:
        out = fit(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"[mio] error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[mio] {e}\n[mio] resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        return e.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
