"""Resumable checkpoints: written atomically, loadable with ``weights_only=True``, holding the
model, optimizer, schedule, every rank's random state and the data position (the DataModule's
own state), written by Lightning's ``Trainer.save_checkpoint`` in the strategy's format: one
file (single process, DDP) or, under FSDP2 (mio/train/sharding.py), a
``torch.distributed.checkpoint`` folder in which each rank writes its shards, resharded on load
to any number of ranks.

Atomic: a checkpoint is written under ``<name>.partial`` and renamed into place when complete
(the rename is atomic for a file and for a folder). ``last.ckpt`` is a symbolic link swapped
atomically to the newest complete checkpoint, and superseded checkpoints are deleted only after
the swap. A kill at any moment -- during a save included -- leaves ``last.ckpt`` naming a
complete checkpoint.

Interruption: SIGINT, SIGTERM and, under Lightning's ``SLURMEnvironment`` with ``auto_requeue``,
SLURM's pre-timeout signal (``requeue_signal``, SIGUSR1 by default; ``#SBATCH
--signal=SIGUSR1@90``) finish the optimizer step under way, write a checkpoint at that step
boundary (SLURM: then requeue the job) and stop the run with :class:`Interrupted`: `mio fit`
prints the command that resumes it and exits with 128 + the signal's number. A second SIGINT
stops at once. Ranks agree on stopping at each step boundary, so a signal that reaches only
some of them stops all of them at the same step.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from mio.log import info
from mio.train.guard import UnstableRun
from mio.userio import MioUserError

PARTIAL = ".partial"
LAST = "last.ckpt"
BEST = "best.ckpt"
STEP = re.compile(r"^step=(\d+)\.ckpt$")


def find_last(dirpath: str | os.PathLike) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes from: the one ``<dirpath>/last.ckpt`` names
    (mio's default ``dirpath`` is ``<trainer.default_root_dir>/checkpoints``), or None when there is
    none -- no folder, no ``last.ckpt``, or a link to a checkpoint that is gone."""
    link = Path(dirpath) / LAST
    if not link.exists():  # follows the link: False for a dangling one
        return None
    return link.resolve() if link.is_symlink() else link


def requeued() -> bool:
    """This process belongs to a SLURM job that SLURM requeued (after :class:`AtomicCheckpoint`
    checkpointed it on the pre-timeout signal): its run resumes from ``last``."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class Interrupted(Exception):
    """A run stopped by a signal after writing a checkpoint at a step boundary."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


def resume_command(argv: list[str]) -> str:
    """``mio fit`` with the same arguments, resuming from the last checkpoint (any ``--ckpt_path``
    given replaced)."""
    return shlex.join(["mio", "fit", *_without(argv, ("--ckpt_path",)), "--ckpt_path", "last"])


def skip_ahead_command(argv: list[str], checkpoint: Path | None, last_skipped: int) -> str:
    """``mio fit`` with the same arguments from ``checkpoint`` (None: from the start), skipping the
    global batches from there through step ``last_skipped`` (any ``--ckpt_path`` and ``data.skip``
    given replaced)."""
    at = checkpoint_step(checkpoint) if checkpoint is not None else 0
    args = _without(argv, ("--ckpt_path", "--data.skip", "--data.skip.at_step", "--data.skip.batches"))
    resume = ["--ckpt_path", str(checkpoint)] if checkpoint is not None else []
    return shlex.join(["mio", "fit", *args, *resume, f"--data.skip.at_step={at}",
                       f"--data.skip.batches={last_skipped - at}"])


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a ``step=N.ckpt`` checkpoint was written at."""
    match = STEP.match(checkpoint.name)
    if match is None:
        raise MioUserError(f"{checkpoint}: not a step=N.ckpt checkpoint")
    return int(match.group(1))


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` (as ``--key value`` or ``--key=value``)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            args.append(arg)
    return args


class AtomicCheckpoint(L.Callback):
    """Checkpoints for resuming: every ``every_n_train_steps`` optimizer steps and when a signal
    stops the run, ``<dirpath>/step=N.ckpt`` with ``last.ckpt`` naming the newest, written
    atomically (see the module's docstring). `mio fit --ckpt_path last` resumes from it, to the
    sample, on any number of processes with the same global batch rows.

    A plain Lightning callback, not a ``ModelCheckpoint``: Lightning's own checkpointing
    (``trainer.enable_checkpointing``) stays off beside it.

    Args:
        every_n_train_steps: optimizer steps between checkpoints; 0: only when a signal stops the run.
        dirpath: where the checkpoints go; default ``<trainer.default_root_dir>/checkpoints``.
        keep_last: how many of the newest checkpoints to keep.
        monitor: a logged metric (``val/loss``): after each validation pass that improves it,
            ``best.ckpt`` is replaced (atomically) by a checkpoint of that step.
        mode: ``min`` or ``max``: which way ``monitor`` improves.
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None, keep_last: int = 1,
                 monitor: str | None = None, mode: str = "min") -> None:
        if every_n_train_steps < 0:
            raise MioUserError(f"every_n_train_steps must be >= 0 (0: no periodic checkpoints), got {every_n_train_steps}")
        if keep_last < 1:
            raise MioUserError(f"keep_last must be >= 1, got {keep_last}")
        if mode not in ("min", "max"):
            raise MioUserError(f"mode must be 'min' or 'max', got {mode!r}")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self.keep_last = keep_last
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None  # the best value of `monitor` so far (kept in the checkpoints)
        self._step = 0  # the global step at the last batch end seen
        self._signum = 0  # the signal received, 0: none
        self._interrupted: Interrupted | None = None  # raised when training ends
        self._handlers: dict[int, Any] = {}  # the handlers ours replaced, restored when training ends
        self._cpu_group: Any = None  # the process group the ranks agree on a signal through

    @property
    def folder(self) -> Path:
        assert self.dirpath is not None, "setup() first"
        return Path(self.dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    # --- when to save ------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step  # > 0 when resumed: that step is saved already
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        if trainer.is_global_zero and resumed is not None and STEP.match(resumed.name) and resumed.exists() \
                and resumed.parent.resolve() == self.folder.resolve():
            # Resumed from an older checkpoint of this folder: `last` names it from now on, so that
            # replacing the abandoned run's newer ones never leaves `last` naming nothing.
            self._point_last(resumed.name)
        self._signum, self._interrupted = 0, None
        if trainer.world_size > 1 and torch.distributed.get_backend() != "gloo":
            # A CPU group (a collective of every rank, once per run): agreeing on a signal then never
            # makes the accelerator's stream wait for the host.
            self._cpu_group = torch.distributed.new_group(backend="gloo")
        # Installed after Lightning's own handlers (which save mid-step or not at all), restored after.
        for signum in self._signals(trainer):
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step:
            return  # a micro-batch of a step still accumulating: not a step boundary
        self._step = step
        signum = self._agreed_signal(trainer)
        if signum or (self.every_n_train_steps and step % self.every_n_train_steps == 0):
            path = self.save(trainer)
            if signum:
                self._stop(trainer, signum, path)

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any rank received (0: none): every rank takes part, so one rank's signal stops
        them all at this step. A CPU tensor: no device-to-host read on the step path."""
        if trainer.world_size == 1:
            return self._signum
        flag = torch.tensor(self._signum)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._cpu_group)
        return int(flag)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise MioUserError(f"checkpoint monitor {self.monitor!r} was not logged; logged: "
                             f"{sorted(trainer.callback_metrics)}")
        value = float(trainer.callback_metrics[self.monitor])  # reduced over ranks: the same on all
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best = value
            self.save(trainer, BEST)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._interrupted is not None:
            raise self._interrupted  # before on_fit_end: an unfinished stage writes no model folder

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, UnstableRun):  # the checkpoint to resume from past the skipped batches
            exception.checkpoint = find_last(self.folder)

    # --- signals ----------------------------------------------------------------------------
    @staticmethod
    def _signals(trainer: L.Trainer) -> list[int]:
        slurm = _requeueing_slurm(trainer)
        return [signal.SIGINT, signal.SIGTERM] + ([slurm.requeue_signal] if slurm is not None else [])

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._signum = signum
        info(f"{signal.Signals(signum).name}: stopping after this optimizer step, with a checkpoint")

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _stop(self, trainer: L.Trainer, signum: int, path: Path) -> None:
        """End the run after this step's other callbacks (they log the step): raised at train end."""
        slurm = _requeueing_slurm(trainer)
        if trainer.is_global_zero and slurm is not None and signum == slurm.requeue_signal:
            _requeue_slurm_job()
        self._interrupted = Interrupted(signum, trainer.global_step, path)
        trainer.should_stop = True

    # --- how to save ------------------------------------------------------------------------
    def save(self, trainer: L.Trainer, name: str | None = None) -> Path:
        """Write ``step=<global step>.ckpt`` atomically and point ``last.ckpt`` at it, or write
        ``name`` atomically (every rank calls)."""
        path = self.folder / (name or f"step={trainer.global_step}.ckpt")
        partial = path.with_name(path.name + PARTIAL)
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f"*{PARTIAL}"):
                _remove(stale)  # left by a run killed while saving
        trainer.strategy.barrier()
        trainer.save_checkpoint(partial, weights_only=False)  # every rank: under FSDP2 each writes its shards
        if trainer.is_global_zero:
            _sync(partial)
            if os.path.isdir(path):  # a sharded one: a folder cannot be replaced in one rename
                _remove(path)  # the checkpoint replaced: best.ckpt, or one of an abandoned run (resumed earlier)
            os.replace(partial, path)  # a file replaces the old one atomically
            if name is None:
                self._point_last(path.name)
                self._prune(trainer.global_step)
            _sync_dir(self.folder)
        trainer.strategy.barrier()
        return path

    def _point_last(self, name: str) -> None:
        link = self.folder / LAST
        tmp = link.with_name(link.name + PARTIAL)
        _remove(tmp)
        os.symlink(name, tmp)
        os.replace(tmp, link)  # atomic: `last` names the old checkpoint or the new one, never nothing

    def _prune(self, step: int) -> None:
        """Delete all but the ``keep_last`` newest checkpoints up to ``step`` (``last`` names ``step``)."""
        steps = sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := STEP.match(p.name)))
        older = [s for s in steps if s <= step]
        for old in older[:-self.keep_last]:
            _remove(self.folder / f"step={old}.ckpt")


def _requeueing_slurm(trainer: L.Trainer) -> SLURMEnvironment | None:
    """Lightning's SLURM environment of this run when it has ``auto_requeue`` on (the default)."""
    # Single-device strategies keep none: Lightning's default under SLURM then.
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None and SLURMEnvironment.detect():
        environment = SLURMEnvironment()
    return environment if isinstance(environment, SLURMEnvironment) and environment.auto_requeue else None


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (an array task as ``<array job>_<task>``)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    outcome = "requeued" if done.returncode == 0 else f"could not be requeued ({done.stderr.strip()})"
    info(f"SLURM job {job} {outcome}")


def _remove(path: str | os.PathLike) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _sync(path: str | os.PathLike) -> None:
    """Flush a written checkpoint (file, or every file of a folder) to disk before the rename."""
    files = [Path(path)] if os.path.isfile(path) else [p for p in Path(path).rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_dir(path: str | os.PathLike) -> None:
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
