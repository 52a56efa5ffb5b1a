"""Which process prepares which unit: ranks from the arguments or the launcher's environment,
and the owner of each unit. Units do not depend on how many ranks run, so ranks split them
without talking to each other: whole parts per rank when there are at least as many parts as
ranks, else the units of each part in turn."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mio.userio import MioUserError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def resolve_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """This process's rank: arguments first, then torchrun (RANK/WORLD_SIZE/LOCAL_RANK), then
    SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), else a single rank."""
    env = os.environ
    for r_key, w_key, l_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank is None and world_size is None and r_key in env and w_key in env:
            try:
                rank, world_size = int(env[r_key]), int(env[w_key])
                local = int(env.get(l_key, "0"))
            except ValueError:
                raise MioUserError(f"{r_key}={env[r_key]!r} / {w_key}={env[w_key]!r} are not integers") from None
            break
    else:
        local = 0
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise MioUserError(f"rank {rank} is not in [0, world size {world_size})")
    return Ranks(rank, world_size, local)


def unit_owner(part: int, chunk: int, n_parts: int, world: int) -> int:
    """Whole parts per rank when there are enough parts, else a part's units in turn."""
    return part % world if n_parts >= world else (part + chunk) % world
