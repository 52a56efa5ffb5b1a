"""Validation data of a stage: held-out shards, read through the training path, the same packs
every time and on any number of processes.

A stage validates on explicit ``data.val_datasets``, or on whole shards held out of each of its
datasets (``data.val_fraction``): :func:`hold_out` picks them by a seeded shuffle of the shard
names, so every run and every rank holds out the same ones, and training never reads them.
Validation data is rendered and packed exactly as training data is (the same mixture class, with
its own seed), and a validation pass is the first ``data.val_packs`` packs of one reader slot:
the same packs every time, whatever the world size. Rank ``r`` takes micro-batch ``i`` from packs
``[(i * W + r) * R, (i * W + r + 1) * R)``; a rank short of packs gets rows without supervised
tokens, so every rank runs as many forwards as the others (collectives under DDP and FSDP) and
the figures, summed over ranks, are those of the same packs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Callable, Iterator, Sequence

import numpy as np

from mio.data.packing import Pack
from mio.data.pipeline import MicroBatch, micro_batch
from mio.userio import MioUserError
from mio.vocab import IGNORE_INDEX


def hold_out(shards: Sequence[str], fraction: float, seed: int, name: str) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards) of one dataset: ``round(fraction * n)`` whole shards
    (at least one), chosen by a shuffle seeded by ``seed`` over the sorted shard names."""
    if not 0.0 < fraction < 1.0:
        raise MioUserError(f"data.val_fraction must be in (0, 1), got {fraction}")
    order = sorted(shards)
    held = max(1, round(fraction * len(order)))
    if held >= len(order):
        raise MioUserError(f"dataset {name}: {len(order)} shard(s) cannot give a validation share of {fraction} by "
                         f"whole shards and keep one for training; prepare it with a smaller shard_size, or give "
                         f"data.val_datasets")
    random.Random(f"val:{seed}:{name}").shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def _unsupervised(pack: Pack) -> Pack:
    """The same row with nothing to score: fills a rank's last micro-batch."""
    return dataclasses.replace(pack, labels=np.full_like(pack.labels, IGNORE_INDEX), keys=[])


class ValBatches:
    """One rank's micro-batches of a validation pass (an iterable Lightning reads to the end).

    ``packs`` gives a fresh iterator over the validation mixture's packs (one reader slot);
    the first ``count`` are read once and kept.
    """

    def __init__(self, packs: Callable[[], Iterator[Pack]], count: int, batch_size: int, rank: int, world: int,
                 pad_id: int) -> None:
        if count < 1:
            raise MioUserError(f"data.val_packs must be positive, got {count}")
        self.packs, self.count, self.batch_size, self.rank, self.world = packs, count, batch_size, rank, world
        self.pad_id = pad_id
        self._cache: list[Pack] | None = None

    def all_packs(self) -> list[Pack]:
        """The pass's packs: read, rendered and packed once, then kept (the same every pass)."""
        if self._cache is None:
            self._cache = list(itertools.islice(self.packs(), self.count))
        return self._cache

    def __len__(self) -> int:
        return math.ceil(self.count / (self.batch_size * self.world))

    def __iter__(self) -> Iterator[MicroBatch]:
        packs = self.all_packs()
        for i in range(len(self)):
            start = (i * self.world + self.rank) * self.batch_size
            rows = packs[start:start + self.batch_size]
            rows += [_unsupervised(packs[0])] * (self.batch_size - len(rows))
            yield micro_batch(rows, self.pad_id)
