"""The training reader: a global order of packed rows that does not depend on the number of
ranks or DataLoader workers, and a data position that is one number.

A stage's global batch has ``G = batch_size x world_size`` rows (packs). Row ``j`` of every
global batch comes from *row stream* ``j``: ``Mixture.rows`` of :mod:`mio.data.reading` run as
reader slot ``j`` of ``G`` -- its 1/G share of every dataset (whole shards, or every G-th sample),
its own token-balanced mixture and best-fit packer, every draw seeded by (seed, j). Rank ``r``
trains rows ``[r*R, (r+1)*R)`` (``R = batch_size``); its DataLoader workers split those streams.
Hence:

- the ranks' samples are disjoint and together cover each dataset once per epoch;
- the global batches are the same for any split of ``G`` rows over ranks: 2 processes x 1 row
  train on exactly what 1 process x 2 rows trains on;
- the data position is the number of micro-batches consumed: every stream has emitted exactly
  that many packs. Resuming replays each stream up to it (reading, rendering and packing only;
  no model work) and goes on with the next pack, on any number of ranks whose rows add up to ``G``.
"""

from __future__ import annotations

import itertools
from typing import Iterator, NotRequired, Sequence

import torch

from mio.data.packing import Pack, PackedBatch, collate_packs
from mio.data.reading import DataCounts, Mixture, PackedRow, ReaderSlot
from mio.userio import MioUserError
from mio.vocab import IGNORE_INDEX

__all__ = ["RankRows", "RankBatches", "MicroBatch", "micro_batch"]


class MicroBatch(PackedBatch):
    """A micro-batch as training and validation steps read it: the collated packs, plus

    - ``keys``: per row, the keys of its samples (what a step trained on, for the sample ledger);
    - ``step_supervised`` (training): supervised tokens of this rank's micro-batches of the same
      optimizer step, so the loss can weigh every token of the global batch alike;
    - ``data`` (training): the :class:`DataCounts` of its rows (tokens per dataset and sample kind,
      and what their streams read and lost since their previous rows), for the training loop to log.
    """

    keys: list[list[str]]
    step_supervised: NotRequired[torch.Tensor]  # () int64
    data: NotRequired[DataCounts]


def micro_batch(packs: Sequence[Pack], pad_id: int, step_supervised: int | None = None,
                counts: DataCounts | None = None) -> MicroBatch:
    """The one assembly of a micro-batch from its packs, for training and validation."""
    batch = MicroBatch(**collate_packs(packs, pad_id=pad_id), keys=[p.keys for p in packs])
    if step_supervised is not None:
        batch["step_supervised"] = torch.tensor(step_supervised, dtype=torch.int64)
    if counts is not None:
        batch["data"] = counts
    return batch


class RankRows(torch.utils.data.IterableDataset):
    """The rows of one rank, micro-batch after micro-batch: streams ``first .. first+count-1``
    in order, each after skipping its first ``skip`` packs.

    With ``k`` DataLoader workers, worker ``w`` runs streams ``first+w, first+w+k, ...``; the
    DataLoader takes one item from each worker in turn, which restores stream order as long as
    ``k`` divides ``count``.
    """

    def __init__(self, mixture: Mixture, first: int, count: int, streams: int, skip: int = 0) -> None:
        super().__init__()
        self.mixture, self.first, self.count, self.streams, self.skip = mixture, first, count, streams, skip

    def __iter__(self) -> Iterator[PackedRow]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(self.first + worker, self.first + self.count, workers)
        streams = [self._skipped(self.mixture.rows(ReaderSlot(rank=j, world=self.streams))) for j in mine]
        while True:
            for s in streams:
                yield next(s)

    def _skipped(self, rows: Iterator[PackedRow]) -> Iterator[PackedRow]:
        """The rows after the first ``skip``. What those read and lost comes with the first row, so
        a resumed run's error counts cover the whole stage; their tokens and dropped conditions
        (shares of steps the run does not train again) do not."""
        counts = DataCounts(len(self.mixture.specs))
        for row in itertools.islice(rows, self.skip):
            counts.add(row.counts)
        counts.tokens[:], counts.kind_tokens[:], counts.cond[:] = 0, 0, 0
        for row in rows:
            yield PackedRow(row.pack, counts.take().add(row.counts))


def _rows_as_they_are(row: PackedRow) -> PackedRow:
    return row


class RankBatches:
    """This rank's micro-batches (:class:`MicroBatch`, with ``step_supervised`` over ``accumulate``
    micro-batches and ``data``).

    An iterable, not a DataLoader: the rows come from a DataLoader over :class:`RankRows` and are
    grouped here, in the main process, so that a micro-batch holds rows of several workers.
    """

    def __init__(self, rows: RankRows, accumulate: int = 1, num_workers: int = 0) -> None:
        if num_workers and rows.count % num_workers:
            raise MioUserError(f"data.num_workers ({num_workers}) must divide data.batch_size ({rows.count}): "
                             "each worker runs whole row streams")
        if accumulate < 1:
            raise MioUserError(f"accumulate must be >= 1, got {accumulate}")
        self.rows, self.accumulate, self.num_workers = rows, accumulate, num_workers

    def __iter__(self) -> Iterator[MicroBatch]:
        per_step = self.rows.count * self.accumulate
        # One optimizer step's rows in flight per worker, so a step never waits on a single row.
        extra = {"prefetch_factor": max(2, -(-per_step // self.num_workers))} if self.num_workers else {}
        loader = torch.utils.data.DataLoader(self.rows, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_rows_as_they_are, **extra)
        rows = iter(loader)
        pad_id = self.rows.mixture.pad_id
        while True:
            step = [[next(rows) for _ in range(self.rows.count)] for _ in range(self.accumulate)]
            supervised = sum(int((r.pack.labels[1:] != IGNORE_INDEX).sum()) for micro in step for r in micro)
            for micro in step:
                counts = DataCounts(len(self.rows.mixture.specs))
                for r in micro:
                    counts.add(r.counts)
                yield micro_batch([r.pack for r in micro], pad_id, step_supervised=supervised, counts=counts)
