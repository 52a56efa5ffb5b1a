"""The install cannot drift: the lock agrees with pyproject, and a broken environment is one clear line
per problem (mio/envcheck.py, the first step of `make test` and `make demo`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mio.envcheck import drift_problems, lock_problems, module_problems, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK, GPU_LOCK, PYPROJECT = ROOT / "requirements.lock", ROOT / "requirements-gpu.lock", ROOT / "pyproject.toml"


def test_the_locks_agree_with_pyproject():
    assert lock_problems(PYPROJECT, LOCK, ("dev",)) == []
    assert lock_problems(PYPROJECT, GPU_LOCK, ("dev", "gpu")) == []
    locked = read_lock(LOCK)
    assert (locked["torch"].version, locked["torchaudio"].version) == ("2.11.0", "2.11.0")  # the exact pair
    assert "flash-attn" not in locked and "flash-attn" in read_lock(GPU_LOCK)
    # every locked file is pinned with its hash: pip installs it with --require-hashes
    blocks = re.split(r"\n(?=[a-z0-9])", LOCK.read_text().split("\n", 2)[-1])
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[a-z0-9]", b))


def mismatched(tmp_path: Path, old: str, new: str) -> Path:
    text = LOCK.read_text()
    assert old in text
    lock = tmp_path / "requirements.lock"
    lock.write_text(text.replace(old, new, 1))
    return lock


def test_a_version_outside_the_range_is_one_line(tmp_path):
    lock = mismatched(tmp_path, "\ntorchaudio==2.11.0 ", "\ntorchaudio==2.11.1 ")
    [line] = lock_problems(PYPROJECT, lock, ("dev",))
    assert "torchaudio==2.11.1 is outside pyproject.toml's range torchaudio==2.11.0" in line and "make lock" in line


def test_a_requirement_missing_from_the_lock_is_one_line(tmp_path):
    text = LOCK.read_text()
    block = re.search(r"\nfastapi==.*?(?=\n[a-z0-9])", text, re.DOTALL)[0]
    lock = tmp_path / "requirements.lock"
    lock.write_text(text.replace(block, ""))
    first, *orphans = lock_problems(PYPROJECT, lock, ("dev",))
    assert first.startswith("requirements.lock: fastapi") and "not in the lock" in first
    # what only fastapi pulled in is now needed by nothing in the lock (starlette, at least)
    assert orphans and all("needed by nothing" in ln and "fastapi" in ln for ln in orphans)
    assert any(ln.startswith("requirements.lock: starlette==") for ln in orphans)


def test_a_package_pyproject_dropped_is_one_line(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT.read_text().replace('    "tiktoken>=0.7,<1",\n', ""))
    assert pyproject.read_text() != PYPROJECT.read_text()
    [line] = lock_problems(pyproject, LOCK, ("dev",))
    assert "tiktoken" in line and "does not ask for it" in line


def test_installed_versions_are_the_locked_ones(tmp_path):
    assert drift_problems(LOCK) == []
    lock = mismatched(tmp_path, "\nsafetensors==", "\nsafetensors==0.0.1+")
    [line] = drift_problems(lock)
    assert line.startswith("safetensors ") and "pins 0.0.1" in line and "make clean && make install" in line


def run_check(tmp_path: Path, *args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, str(ROOT)])
    return subprocess.run([sys.executable, "-m", "mio.envcheck", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


@pytest.mark.slow
def test_a_torchaudio_that_does_not_load_is_one_line_naming_the_pair(tmp_path):
    """The failure a fresh machine met: torchaudio's library does not load beside the installed torch."""
    fake = tmp_path / "shadow" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise OSError("libtorchaudio.so: undefined symbol: '
                                      'torch_exception_get_what_without_backtrace")\n')
    out = run_check(tmp_path, "--root", str(ROOT), pythonpath=str(fake.parent))
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert re.match(r"\[mio\] environment: torchaudio 2\.11\.0\S* does not load beside torch 2\.11\.0\S* "
                    r"\(libtorchaudio\.so: undefined symbol", line), line
    assert "exact pair" in line and "make clean && make install" in line


@pytest.mark.slow
def test_a_mismatched_lock_fails_the_check(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT.read_text())
    mismatched(root, "\ntorchaudio==2.11.0 ", "\ntorchaudio==2.11.1 ")
    out = run_check(tmp_path, "--root", str(root))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    # the range, and the installed release that is not the pinned one: both name torchaudio
    assert len(lines) == 2 and all("torchaudio" in ln for ln in lines), lines


def test_every_mio_module_imports():
    """The check's last step: an import that breaks a command (a name moved away) fails here, not in
    the one test that happens to start that command."""
    count, problems = module_problems()
    assert problems == [] and count > 50
