"""Resumable checkpoints: written atomically, loadable with ``weights_only=True``, holding every
rank's random state (the data position is the DataModule's own state in the same file).

Atomic: a checkpoint is written under ``<name>.partial`` and renamed into place when complete
(a file or, for sharded strategies, a directory: the rename is atomic for both). ``last.ckpt`` is
a symbolic link swapped atomically to the newest complete checkpoint, and the checkpoint it
pointed to before is deleted only after the swap. A kill at any moment -- during a save
included -- leaves ``last.ckpt`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

PARTIAL = ".partial"
LAST = "last.ckpt"


def find_last(dirpath: str | os.PathLike) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes from: the one ``<dirpath>/last.ckpt`` names
    (mio's default ``dirpath`` is ``<trainer.default_root_dir>/checkpoints``), or None when there is
    none -- no folder, no ``last.ckpt``, or a link to a checkpoint that is gone."""
    link = Path(dirpath) / LAST
    if not link.exists():  # follows the link: False for a dangling one
        return None
    return link.resolve() if link.is_symlink() else link


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for resuming: every ``every_n_train_steps`` optimizer steps, keep the
    newest checkpoint (``step=N.ckpt``) and ``last.ckpt`` pointing at it, written atomically.

    ``dirpath`` defaults to ``<trainer.default_root_dir>/checkpoints`` (not the logger's version
    folder), so a resumed run -- ``mio fit ... --ckpt_path last`` -- finds the run it continues.
    Other ``ModelCheckpoint`` settings (``monitor``, ``save_top_k``...) pass through.
    """

    def __init__(self, every_n_train_steps: int = 500, filename: str = "step={step}", save_last: bool | str = "link",
                 **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=every_n_train_steps, filename=filename, save_last=save_last,
                         auto_insert_metric_name=False, **kwargs)
        self._doomed: list[str] = []  # superseded checkpoints, deleted once `last` no longer points at them

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)  # `--ckpt_path last` is resolved before setup
        return super()._find_last_checkpoints(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL
        if trainer.is_global_zero:
            _remove(partial)  # left by a run killed while saving
        trainer.strategy.barrier()
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            _sync(partial)
            if os.path.isdir(filepath) and not os.path.islink(filepath):
                shutil.rmtree(filepath)  # a directory cannot be renamed over a directory
            os.replace(partial, filepath)
            _sync_dir(os.path.dirname(filepath))
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            tmp = linkpath + PARTIAL
            _remove(tmp)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            os.replace(tmp, linkpath)  # atomic: `last` names the old checkpoint or the new one, never nothing
            _sync_dir(os.path.dirname(linkpath))
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._doomed.append(filepath)  # after `last` moved on (see _save_last_checkpoint)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        doomed, self._doomed = self._doomed, []
        for path in doomed:
            super()._remove_checkpoint(trainer, path)


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _sync(path: str) -> None:
    """Flush a written checkpoint (file, or every file of a directory) to disk before the rename."""
    files = [Path(path)] if os.path.isfile(path) else [p for p in Path(path).rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- random state ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and plain values (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def plain(value: Any) -> Any:
    """Settings as plain containers (dataclasses -> dicts, paths -> strings), so a checkpoint's
    hyper-parameters load under ``weights_only=True``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
