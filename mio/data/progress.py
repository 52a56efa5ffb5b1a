"""What a prepare run measures of itself: rows per second, the share of the input read, the
time left and how busy the media tokenizers are (progress lines; `mio bench prepare` reads the
same object)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from mio.data.formats import InputRow
from mio.data.inputs import Part

PROGRESS_EVERY_S = 30.0

Log = Callable[[str], None]


@dataclass
class Meter:
    """Rows per second, time left and how busy the tokenizers are (progress lines; `mio bench
    prepare` reads the same object). ``read`` is the fraction of this rank's input read, parts
    weighted by their size in bytes."""

    log: Log | None = None
    started: float = field(default_factory=time.perf_counter)
    rows: int = 0  # rows of the units this run prepared
    encode_s: float = 0.0  # seconds the media tokenizers were encoding
    first_encode: float | None = None  # when they started (building them and the first batch's decoding come before)
    read: float = 0.0
    read_at_start: float | None = None
    weights: dict[int, float] = field(default_factory=dict)  # part index -> share of the input
    done_weight: float = 0.0
    last_line: float = field(default_factory=time.perf_counter)

    def plan(self, parts: list[Part]) -> None:
        sizes = {p.index: p.size() for p in parts}
        known = [s for s in sizes.values() if s]
        typical = sum(known) / len(known) if known else 1.0
        total = sum(s or typical for s in sizes.values()) or 1.0
        self.weights = {i: (s or typical) / total for i, s in sizes.items()}

    def part_done(self, part: Part) -> None:
        self.done_weight += self.weights.get(part.index, 0.0)
        self.read = self.done_weight

    def row_read(self, part: Part, row: InputRow) -> None:
        if row.read is not None:
            self.read = self.done_weight + self.weights.get(part.index, 0.0) * min(row.read, 1.0)

    def rows_done(self, n: int) -> None:
        if self.read_at_start is None:
            self.read_at_start = self.read
        self.rows += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def encoded(self, start: float) -> None:
        """One tokenizer call that began at ``start`` has ended."""
        self.first_encode = start if self.first_encode is None else self.first_encode
        self.encode_s += time.perf_counter() - start

    def busy(self) -> float:
        """The fraction of the time since the tokenizers' first call that they were encoding."""
        if self.first_encode is None:
            return 0.0
        return self.encode_s / max(time.perf_counter() - self.first_encode, 1e-9)

    def line(self) -> str:
        s = self.seconds
        parts = [f"{self.rows / max(s, 1e-9):,.1f} rows/s", f"{100 * self.read:.0f}% of the input read"]
        gained = self.read - (self.read_at_start or 0.0)
        if 0 < gained and self.read < 1:
            parts.append(f"~{_duration(s * (1 - self.read) / gained)} left")
        if self.encode_s:
            parts.append(f"tokenizers busy {100 * self.busy():.0f}%")
        return ", ".join(parts)

    def unit_finished(self, name: str, samples: int, skipped: int) -> None:
        if self.log:
            self.log(f"{name}: {samples} samples, {skipped} skipped | {self.line()}")
            self.last_line = time.perf_counter()

    def batch_finished(self, unit: str) -> None:
        if self.log and time.perf_counter() - self.last_line >= PROGRESS_EVERY_S:
            self.log(f"{unit} in progress | {self.line()}")
            self.last_line = time.perf_counter()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
