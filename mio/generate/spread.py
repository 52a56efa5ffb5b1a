"""Prompts spread over the ranks of a torchrun or srun job (`mio generate --prompts`, `mio eval`).

The prompts are cut into the batches one process would decode, and batch ``b`` goes to rank
``b % world``: every prompt is decoded in the very batch it would be in alone, so each answer
(greedy or seeded) is the one a single process gives, and so are the files written from it.
Rank 0 gathers what the others made, in batch order, and writes or prints what a single
process would.

Ranks come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, ...), as
`mio prepare` reads them; the gathering goes through torch.distributed's gloo backend, whose
rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT; under srun, export them). Each rank uses
GPU ``LOCAL_RANK`` where there are GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from mio.data.ranks import Ranks, resolve_ranks

T = TypeVar("T")
# A rank that finishes its share early waits in the gather for the slowest one.
GATHER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Spread:
    ranks: Ranks

    @classmethod
    def from_env(cls) -> "Spread":
        spread = cls(resolve_ranks())
        if spread.ranks.world > 1 and not torch.distributed.is_initialized():
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ValueError(f"{spread.ranks.world} ranks need a rendezvous: set {' and '.join(missing)} (torchrun "
                                 "sets them; under srun, export MASTER_ADDR=<first node> MASTER_PORT=<free port>)")
            torch.distributed.init_process_group("gloo", init_method="env://", rank=spread.ranks.rank,
                                                 world_size=spread.ranks.world, timeout=GATHER_TIMEOUT)
        return spread

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes and prints what concerns the whole job."""
        return self.ranks.rank == 0

    def device(self, asked: str | None) -> str | None:
        """The device a rank decodes on: the one asked for, else GPU ``LOCAL_RANK`` of a node's GPUs."""
        if asked is not None or self.ranks.world == 1 or not torch.cuda.is_available():
            return asked
        return f"cuda:{self.ranks.local_rank % torch.cuda.device_count()}"

    def batches(self, count: int) -> list[int]:
        """The batches (of ``count``) this rank decodes."""
        return list(range(self.ranks.rank, count, self.ranks.world))

    def gather(self, mine: Sequence[tuple[int, T]]) -> list[T] | None:
        """Every rank's ``(batch, value)`` pairs -> on rank 0, the values in batch order; None on the others."""
        if self.ranks.world == 1:
            return [v for _, v in sorted(mine, key=lambda x: x[0])]
        parts: list[Any] | None = [None] * self.ranks.world if self.lead else None
        torch.distributed.gather_object(list(mine), parts, dst=0)
        if parts is None:
            return None
        return [v for _, v in sorted((pair for part in parts for pair in part), key=lambda x: x[0])]

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
