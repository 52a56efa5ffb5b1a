"""What `mio prepare` may do to its --out folder: refuse one that holds anything but a mio dataset
(or another recipe's shards), and empty one for --overwrite, once per job. One job writes a folder
at a time (:mod:`mio.data.lock`); the ranks of a job share it."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from mio.data.lock import LOCK, MEMBERS, FolderLock, FolderLocked
from mio.data.shards import MANIFEST
from mio.data.units import UNITS
from mio.userio import MioUserError

CLEARED = ".mio-prepare.cleared"  # the job whose --overwrite emptied the folder (its ranks clear once)
SHARD_NAME = re.compile(r".+-\d{5}-\d{5}\.tar")


def ours(name: str) -> bool:
    """Whether a file name in an --out folder is one prepare writes."""
    return (name in (MANIFEST, UNITS, LOCK, MEMBERS, CLEARED) or name.startswith(f"{LOCK}.")
            or SHARD_NAME.fullmatch(name) is not None or (name.startswith(".") and name.endswith(".tmp")))


def check_folder(out: Path, source: str) -> None:
    """Refuse a folder that holds anything but a mio dataset, or another recipe's shards."""
    foreign = sorted(p.name for p in out.iterdir() if not ours(p.name)) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise MioUserError(f"{out} is not empty and holds no mio dataset ({shown}); give --out a new or empty folder")
    other = [p.name for p in out.glob("*.tar") if not p.name.startswith(f"{source}-")]
    if other:
        raise MioUserError(f"{out} holds shards of another dataset ({other[0]}, ...); give each recipe its own --out, "
                         f"or pass --overwrite to replace that dataset")


def clear_folder(out: Path) -> None:
    """Remove what prepare wrote in ``out`` (shards, records, manifest, temporary files); the
    lock files stay (the caller holds the lock)."""
    for p in out.iterdir():
        if p.name in (LOCK, MEMBERS) or p.name.startswith(f"{LOCK}.") or not ours(p.name):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def cleared_by(out: Path) -> str | None:
    return (out / CLEARED).read_text().strip() if (out / CLEARED).is_file() else None


def wait_for_clear(out: Path, lock: FolderLock) -> None:
    """A rank that joined an --overwrite job waits until the rank holding the lock has emptied
    the folder (it writes the job into CLEARED when done)."""
    while cleared_by(out) != lock.job:
        if not lock.live_members(lock.job):
            raise FolderLocked(f"{out}: the process of this job that was clearing the folder for --overwrite is gone; "
                               f"run again")
        time.sleep(0.1)
