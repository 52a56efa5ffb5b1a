"""mio's messages to the user: the ``mio`` logger, written to stderr as ``[mio] message``.

`mio -q` shows warnings and errors only, `mio -v` adds debug messages (and the dependencies'
messages mio otherwise filters, :mod:`mio.noise`). A library user configures the ``mio`` logger
like any other.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("mio")
PREFIX = "[mio] "


class _StderrHandler(logging.Handler):
    """Each line of a message as ``[mio] line`` on the ``sys.stderr`` of the moment (a stream
    swapped in after import, as pytest's capture does, still gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            sys.stderr.write("".join(f"{PREFIX}{line}\n" for line in text.split("\n")))
            sys.stderr.flush()
        except Exception:  # logging's own contract: a failing handler reports, never raises
            self.handleError(record)


if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
    LOGGER.addHandler(_StderrHandler())
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # once, on stderr: not again through a root handler a dependency set up


def set_verbosity(verbose: bool = False, quiet: bool = False) -> None:
    """`mio -v` / `mio -q`: debug messages too, or warnings and errors only."""
    LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def info(msg: str) -> None:
    LOGGER.info(msg)


def warning(msg: str) -> None:
    LOGGER.warning(msg)


def error(msg: str) -> None:
    LOGGER.error(msg)


def global_rank() -> int:
    """This process's rank in a distributed job (0 alone): torch.distributed's once it runs, else
    the launcher's (torchrun's RANK, SLURM's SLURM_PROCID)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def rank_zero_info(msg: str) -> None:
    """``info`` on global rank 0 only: a message every rank would print alike."""
    if global_rank() == 0:
        LOGGER.info(msg)
