"""Callbacks of the training loop."""

from __future__ import annotations

import sys
import time

import lightning as L


class StepLog(L.Callback):
    """One plain progress line every ``every_n_steps`` optimizer steps (for logs and non-TTY
    runs, where a progress bar is noise): step, loss, tokens per second, time left."""

    def __init__(self, every_n_steps: int = 20) -> None:
        self.every = every_n_steps
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step != trainer.max_steps):
            return
        m = trainer.callback_metrics
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(step, 1) * (trainer.max_steps - step)
        loss = float(m["loss"]) if "loss" in m else float("nan")
        tps = float(m["tok/s"]) if "tok/s" in m else float("nan")
        print(f"[mio] step {step}/{trainer.max_steps} loss {loss:.3f} tokens/s {tps:.0f} "
              f"elapsed {elapsed:.0f}s left {left:.0f}s", file=sys.stderr, flush=True)
