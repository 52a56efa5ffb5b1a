"""`mio fit`: LightningCLI over the one module and data module; a stage is a YAML file."""

from __future__ import annotations

import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from mio.train.data import MioDataModule
from mio.train.module import MioModule


class MioCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        # The data pipeline reads the text tokenizer and vocabulary from the model's backbone.
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.extend_vocab", "data.extend_vocab")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if trainer.logger in (None, True):
            # CSV by default (always installed), next to the stage's outputs.
            trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                              "init_args": {"save_dir": trainer.default_root_dir or ".", "name": "logs"}}


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
