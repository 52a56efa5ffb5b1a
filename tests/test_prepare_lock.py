"""One writer per prepared folder, Ctrl-C, --overwrite and the folders prepare refuses, with real
processes: a `mio prepare` writing a folder refuses a second job at once, takes SIGINT with one
line and resumes from where it stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_support import snapshot, stalling_pipe

from mio.data.lock import LOCK, MEMBERS, FolderLock, FolderLocked, job_id
from mio.data.prepare import prepare

WORDS = "the cat sat on a warm mat while rain fell over the quiet town".split()


def _input(folder: Path, rows: int) -> Path:
    with open(folder / "rows.jsonl", "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"text": f"{i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 30))})
                     + "\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text("data_type: text\nsource: words\ninput: rows.jsonl\nshard_size: 50\nbatch_size: 50\n")
    return recipe


@pytest.mark.slow
def test_second_job_refused_sigint_one_line_and_resume(tmp_path):
    recipe = _input(tmp_path, 6000)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    read_end, write_end = stalling_pipe()  # a progress line per unit: blocked after a few dozen of 120
    # SIGINT at its default in the child: a shell's background job (`make test &`) starts with it ignored.
    child = subprocess.Popen([sys.executable, "-m", "mio.cli", "prepare", str(recipe), "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=write_end,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(write_end)
    try:
        deadline = time.time() + 120
        while len(list(out.glob(".units/*.json"))) < 3 and time.time() < deadline and child.poll() is None:
            time.sleep(0.02)
        with pytest.raises(FolderLocked, match=f"being written by another `mio prepare`.*pid {child.pid}"):
            prepare(recipe, out)  # this process is another job
        child.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as stream:
            err = stream.read()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    lines = err.decode().strip().splitlines()
    assert child.returncode == 130 and "Traceback" not in err.decode(), err.decode()[-2000:]
    assert "run the same command to resume" in lines[-1] and lines[-1].startswith("[mio] interrupted: ")
    assert re.fullmatch(r"\[mio\] words-00000-00002: 50 samples, 0 skipped \| [\d,.]+ rows/s, \d+% of the input read, "
                        r"~\d+[hms]\S* left", lines[2]), lines[:3]  # progress: rows per second and the time left
    units = len(list(out.glob(".units/*.json")))
    assert f"{units} units of {out} are done" in lines[-1] and units < 120
    assert not (out / LOCK).exists() and not (out / MEMBERS).exists()  # released on the way out

    said: list[str] = []
    prepare(recipe, out, progress=said.append)
    assert said[0] == f"{out}: {units} units already done by an earlier run; preparing the rest"
    prepare(recipe, tmp_path / "ref")
    assert snapshot(out) == snapshot(tmp_path / "ref")


def test_ranks_of_one_job_share_the_lock_other_jobs_do_not(tmp_path):
    recipe = _input(tmp_path, 120)
    out = tmp_path / "out"
    torchrun = {"TORCHELASTIC_RUN_ID": "7", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert job_id(torchrun) == "torchrun:7@10.0.0.1:29500"
    assert job_id({**torchrun, "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}) == "slurm:42.3"
    out.mkdir()
    with FolderLock(out, job=job_id(torchrun)) as held:  # rank 0 of the job holds the folder
        assert held.owner
        with pytest.raises(FolderLocked, match=f"job torchrun:7@10.0.0.1:29500, host {socket.gethostname()}"):
            prepare(recipe, out)
        os.environ.update(torchrun)
        try:
            assert prepare(recipe, out, rank=1, world_size=2)["merged"] is False  # rank 1 joins it
        finally:
            for key in torchrun:
                del os.environ[key]
        assert (out / LOCK).is_file()  # rank 1 left; rank 0 still holds the folder
    assert not (out / LOCK).exists()


def test_overwrite_and_folders_that_are_refused(tmp_path):
    recipe = _input(tmp_path, 120)
    out = tmp_path / "out"
    first = prepare(recipe, out)
    (out / "words-00009-00000.tar").write_bytes(b"left over from another input")
    (tmp_path / "rows.jsonl").write_text('{"text": "one row"}\n')  # a changed input refuses to mix ...
    with pytest.raises(ValueError, match="changed since unit.*--overwrite"):
        prepare(recipe, out)
    again = prepare(recipe, out, overwrite=True)  # ... and --overwrite starts afresh
    assert first["samples"] == 120 and again["samples"] == 1
    assert sorted(p.name for p in out.glob("*.tar")) == ["words-00000-00000.tar"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"not empty and holds no mio dataset \(thesis.tex\)"):
            prepare(recipe, notes, overwrite=overwrite)
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]
