"""One writer per prepared folder: a lock that belongs to a job, not to one process.

``DIR/.mio-prepare.lock`` (created with O_EXCL) names the job that writes DIR, with the host, pid
and start time of the process that took it. Every process of that job (the ranks of one
torchrun or SLURM job share the folder) also keeps a member file
``DIR/.mio-prepare.members/HOST-PID-*.json``, touched every :data:`HEARTBEAT_S` seconds.

A second job finds the lock, checks whether any member of the lock's job is alive (on this
host: its pid exists; on another host: its member file was touched within
:data:`STALE_AFTER_S`), and stops at once with an error naming host, pid and job. A lock whose
job has no live member (a SIGKILLed run) is stale: it is removed, said so, and taken.

The job is SLURM's (``SLURM_JOB_ID`` and step) or torchrun's (``TORCHELASTIC_RUN_ID`` with
``MASTER_ADDR``:``MASTER_PORT``), else the process itself.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from mio.userio import MioUserError

LOCK = ".mio-prepare.lock"
MEMBERS = ".mio-prepare.members"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a member on another host is dead after this long without a heartbeat


class FolderLocked(MioUserError):
    """Another job is writing the folder (a usage error: the command line says so and exits 2)."""


def job_id(env: dict[str, str] | None = None) -> str:
    """Which job this process belongs to: processes of one job share a folder's lock."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    if env.get("TORCHELASTIC_RUN_ID") and env.get("MASTER_ADDR"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}@{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # gone, or being written this instant
        return None
    return data if isinstance(data, dict) else None


def _alive(member: dict[str, Any], path: Path) -> bool:
    if member.get("host") == socket.gethostname():
        try:
            os.kill(int(member["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True
    try:
        return time.time() - path.stat().st_mtime < STALE_AFTER_S
    except FileNotFoundError:
        return False


class FolderLock:
    """``with FolderLock(out) as lock:`` -- the folder is this job's until the block ends.
    ``lock.owner`` is True for the process that took the lock (the others joined it)."""

    def __init__(self, folder: Path, job: str | None = None, log: Callable[[str], None] | None = None) -> None:
        self.folder = folder
        self.job = job or job_id()
        self.log = log
        self.lock = folder / LOCK
        self.members = folder / MEMBERS
        self.me = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.member = self.members / f"{self.me['host']}-{self.me['pid']}-{uuid.uuid4().hex[:8]}.json"
        self.owner = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "FolderLock":
        for _ in range(3):  # a finishing job may remove the members folder between mkdir and write
            self.members.mkdir(parents=True, exist_ok=True)
            try:
                self.member.write_text(json.dumps(self.me))  # before the lock: a live owner always has one
                break
            except FileNotFoundError:
                continue
        try:
            self._take()
        except BaseException:
            self.member.unlink(missing_ok=True)
            raise
        self._beat = threading.Thread(target=self._heartbeat, name="mio-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self.member.unlink(missing_ok=True)
        holder = _read_json(self.lock)
        if holder is not None and holder.get("job") == self.job and not self.live_members(self.job):
            self.lock.unlink(missing_ok=True)
            try:
                self.members.rmdir()  # a finished dataset folder keeps no lock files
            except OSError:  # another job's process is starting: it keeps its member file
                pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.member)
            except FileNotFoundError:  # the folder was removed under us; nothing to keep alive
                return

    def live_members(self, job: str) -> list[dict[str, Any]]:
        live = []
        for path in sorted(self.members.glob("*.json")):
            m = _read_json(path)
            if m is not None and m.get("job") == job and _alive(m, path):
                live.append(m)
        return live

    def _take(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(self.lock)
                if holder is None:  # being written or just removed: look again
                    time.sleep(0.05)
                    continue
                if holder.get("job") == self.job:
                    return  # another process of this job holds it: share the folder
                if self.live_members(str(holder.get("job"))):
                    raise FolderLocked(
                        f"{self.folder} is being written by another `mio prepare` (job {holder.get('job')}, host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}); wait for it "
                        f"to finish or stop it. (If no such process runs, remove {self.lock}.)") from None
                self._remove_stale(holder)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.me))
            self.owner = True
            return
        raise FolderLocked(f"{self.folder}: could not take {self.lock} (it keeps changing hands)")

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Remove a lock whose job has no live process, unless another process replaced it first."""
        aside = self.lock.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.lock, aside)
        except FileNotFoundError:
            return
        if _read_json(aside) != holder:  # another process took the stale lock meanwhile: give it back
            try:
                os.link(aside, self.lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink()
        for path in self.members.glob("*.json"):
            m = _read_json(path)
            if m is not None and m.get("job") == holder.get("job"):
                path.unlink(missing_ok=True)
        if self.log:
            self.log(f"removed a stale lock of {self.folder} (job {holder.get('job')}, host {holder.get('host')}, "
                     f"pid {holder.get('pid')}: no process of that job is alive)")
