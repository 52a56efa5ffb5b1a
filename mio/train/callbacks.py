"""Callbacks of the training loop."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from mio.log import info


class StepLog(L.Callback):
    """One plain progress line every ``every_n_steps`` optimizer steps (for logs and non-TTY
    runs, where a progress bar is noise): step, loss, learning rate, tokens per second, time left."""

    def __init__(self, every_n_steps: int = 20) -> None:
        self.every = every_n_steps
        self.start = 0.0
        self.first_step = self.last_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()
        self.first_step = self.last_step = trainer.global_step  # > 0 when resumed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        step = trainer.global_step
        stepped, self.last_step = step != self.last_step, step  # not while micro-batches accumulate
        if not trainer.is_global_zero or not stepped or (step % self.every and step != trainer.max_steps):
            return
        m = trainer.callback_metrics
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(step - self.first_step, 1) * (trainer.max_steps - step)
        parts = [f"step {step}/{trainer.max_steps}"]
        if "loss" in m:
            parts.append(f"loss {float(m['loss']):.3f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if "tok/s" in m:  # from the second step on: a rate needs the time between two steps
            parts.append(f"tokens/s {float(m['tok/s']):.0f}")
        parts.append(f"elapsed {elapsed:.0f}s left {left:.0f}s")
        info(" ".join(parts))


class SampleLedger(L.Callback):
    """What every optimizer step trained on, per rank: ``<default_root_dir>/ledger/rank{r}.jsonl``,
    one line per step with the global step, the keys of the samples of each row (of every
    micro-batch of the step), the step's loss (null on a step the trainer does not log: set
    ``trainer.log_every_n_steps`` to 1 for every step's) and, with ``weights_digest``, a SHA-256 of the
    weights after the step (identical on every rank of a data-parallel run; under FSDP2, of the rank's shards).

    A resumed run first drops the lines past the step it resumed from, so the ledger is the
    history of the run as checkpointed: after a kill and a resume, no step appears twice.
    """

    def __init__(self, weights_digest: bool = False) -> None:
        self.weights_digest = weights_digest
        self.path: Path | None = None
        self._rows: list[list[str]] = []
        self._step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = Path(trainer.default_root_dir) / "ledger" / f"rank{trainer.global_rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _ledger_lines(self.path) if line["step"] <= trainer.global_step]
        self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        self._rows += batch.get("keys", [])
        if trainer.global_step == self._step:
            return  # a micro-batch of a step still accumulating
        self._step = trainer.global_step
        # The step's loss where the step was logged (the training loop reads it back only then).
        logged = trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0
        loss = trainer.callback_metrics.get("loss") if logged else None
        line = {"step": trainer.global_step, "keys": self._rows, "loss": None if loss is None else float(loss)}
        self._rows = []
        if self.weights_digest:
            line["weights"] = weights_digest(pl_module)
        assert self.path is not None
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal exactly when the weights are (under
    FSDP2, this rank's shards)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        local = p.detach().to_local() if isinstance(p, DTensor) else p.detach()
        h.update(name.encode())
        h.update(local.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ledger_lines(path: Path) -> list[dict]:
    """The complete lines of a ledger (a run killed while writing leaves half a line)."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines
