"""The step guard: a bad optimizer step never reaches the weights.

At every optimizer step, after the backward pass and before clipping, ``MioModule`` hands the
guard the step's global loss (the token mean over every rank's micro-batches) and the gradient
norm before clipping, both already reduced over ranks, so every rank judges the same two numbers
and all ranks skip together (DDP and FSDP2 alike). A step is skipped when either is not finite,
or, with ``spike_factor`` set, when the loss exceeds ``spike_factor`` times the median loss of the
last ``spike_window`` steps kept. Skipping sets the gradients to None: AdamW then changes neither
a weight nor a moment nor its step count; the learning-rate schedule and the data position move on
(the batch is consumed, as PaLM skipped the batches around a spike).

Each skipped step is a line of ``<stage folder>/skipped_steps.jsonl`` (step, reason, loss, gradient
norm, the sample keys of every row of its global batch). After ``max_consecutive_skips`` skips in
a row the stage stops with :class:`UnstableRun`; `mio fit` adds the last checkpoint and the command
that resumes from it past those batches (``data.skip``).

Deciding needs the two numbers on the host: one read of the device per optimizer step (the
training figures themselves are read once per logged step).
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from mio.userio import MioUserError

SKIPS_FILE = "skipped_steps.jsonl"


@dataclass
class GuardSettings:
    """``model.guard``: when a step is kept out of the weights.

    Args:
        enabled: skip a step whose loss or gradient norm is not finite (and, with ``spike_factor``, a spike).
        spike_factor: also skip a step whose loss exceeds this factor times the median loss of the
            last ``spike_window`` kept steps (judged once that many were kept); None: no spike check
            (the default; the pretraining stages set it).
        spike_window: kept steps the median is taken over.
        max_consecutive_skips: skips in a row after which the stage stops with an error.
    """

    enabled: bool = True
    spike_factor: float | None = None
    spike_window: int = 100
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise MioUserError(f"model.guard.spike_factor must be above 1 (or null: no spike check), got {self.spike_factor}")
        if self.spike_window < 1 or self.max_consecutive_skips < 1:
            raise MioUserError(f"model.guard.spike_window ({self.spike_window}) and max_consecutive_skips "
                             f"({self.max_consecutive_skips}) must be positive")


@dataclass
class SkippedStep:
    step: int  # the optimizer step, counted from 1 (as the sample ledger)
    reason: str
    loss: float
    grad_norm: float
    keys: list[list[str]] = field(default_factory=list)  # the samples of each row of the global batch


class UnstableRun(RuntimeError):
    """``max_consecutive_skips`` optimizer steps in a row were skipped: the stage stops."""

    def __init__(self, skips: list[SkippedStep], skips_file: Path) -> None:
        self.skips, self.skips_file = skips, skips_file
        self.checkpoint: Path | None = None  # the last checkpoint, set by mio.train.checkpoint.AtomicCheckpoint
        reasons = sorted({s.reason for s in skips})
        super().__init__(f"{len(skips)} optimizer steps in a row were skipped (steps {skips[0].step}-{skips[-1].step}: "
                         f"{', '.join(reasons)}; last loss {skips[-1].loss:.4g}, gradient norm "
                         f"{skips[-1].grad_norm:.4g}); no skipped step changed the weights. Their batches' sample "
                         f"keys are in {skips_file}")

    @property
    def last_step(self) -> int:
        return self.skips[-1].step


class Guard:
    """The decisions of one rank (every rank decides the same from the same reduced figures)."""

    def __init__(self, settings: GuardSettings, stage_dir: str | Path, writer: bool) -> None:
        self.settings = settings
        self.path = Path(stage_dir) / SKIPS_FILE
        self.writer = writer  # global rank 0 writes the file
        self.history: deque[float] = deque(maxlen=settings.spike_window)  # losses of the last kept steps
        self.run: list[SkippedStep] = []  # the skips in a row up to now
        self.skipped = 0  # skipped steps of the stage (this run and the runs it resumed)

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """Why the step must be skipped, or None to keep it."""
        if loss != loss or abs(loss) == float("inf"):
            return "non-finite loss"
        if grad_norm != grad_norm or grad_norm == float("inf"):
            return "non-finite gradient norm"
        factor = self.settings.spike_factor
        if factor is not None and len(self.history) == self.history.maxlen:
            median = statistics.median(self.history)
            if loss > factor * median:
                return f"loss spike (over {factor} x the median {median:.4g} of the last {len(self.history)} kept steps)"
        return None

    def keep(self, loss: float) -> None:
        self.history.append(loss)
        self.run = []

    def skip(self, skipped: SkippedStep) -> None:
        """Count and write the skip; raise :class:`UnstableRun` after too many in a row."""
        self.skipped += 1
        self.run.append(skipped)
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(skipped)) + "\n")
        if len(self.run) >= self.settings.max_consecutive_skips:
            raise UnstableRun(self.run, self.path)

    def state_dict(self) -> dict[str, object]:
        return {"history": list(self.history), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.history.extend(state.get("history", []))  # type: ignore[arg-type]
        self.skipped = int(state.get("skipped", 0))  # type: ignore[arg-type]


class NonFiniteWeights(RuntimeError):
    """The stage's weights hold NaN or Inf: its model folder is not written."""


def check_finite_weights(state: Mapping[str, torch.Tensor], out: Path) -> None:
    """Refuse to write ``out`` from weights holding a non-finite value (rank 0's full state)."""
    names = [name for name, t in state.items() if t.is_floating_point()]
    if not names:
        return
    finite = torch.stack([torch.isfinite(state[name]).all() for name in names]).tolist()  # one read
    bad = [name for name, ok in zip(names, finite) if not ok]
    if bad:
        raise NonFiniteWeights(f"{len(bad)} of the stage's {len(state)} weight tensors hold NaN or Inf ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}): {out} was not written. The run diverged: resume "
                               f"from a checkpoint before it with a lower model.lr (or model.guard on, its default, "
                               f"which keeps non-finite steps out of the weights)")
