"""Helpers shared by the prepare tests: raw tar shards as downloaders write them, and what "the
same prepared output" means."""

from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
from pathlib import Path

from mio.data.shards import MANIFEST, file_sha256


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A plain tar of ``KEY.EXT`` members (img2dataset's layout), members in the order given."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def snapshot(out: Path) -> dict[str, str]:
    """Every shard's checksum plus the manifest: what 'the same output' means."""
    files = {p.name: file_sha256(p) for p in out.glob("*.tar")}
    files[MANIFEST] = json.dumps(json.loads((out / MANIFEST).read_text()), sort_keys=True)
    return files


def stalling_pipe() -> tuple[int, int]:
    """A pipe of one page (read end, write end) for a child's progress lines that the test does
    not read until it has signalled the child: with 4 KiB pages (x86_64) the child's writes block
    after a few dozen lines, so however fast it runs and however late the test is scheduled, the
    signal finds it mid-run."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    return read_end, write_end
