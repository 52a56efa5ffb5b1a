"""A wheel carries what it needs: `pip install .` (not editable) into a fresh virtualenv, then, from a
folder outside the repository, the commands that read mio's shipped folders (stages/, tokenizers/,
data_recipes/ with its samples) run from the installed package alone.

The fresh venv gets only the wheel; the locked dependencies come from the venv running this test,
through a .pth line (installing 5 GB of torch again would test pip, not mio). That venv's own
editable mio is not visible there: a .pth line adds a folder, not the .pth files inside it.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_an_installed_wheel_runs_from_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(ROOT)], tmp_path, env)
    [wheel] = wheels.glob("mio-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    purelib = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "locked_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
         str(wheel)], tmp_path, env)
    mio = str(venv / "bin" / "mio")

    where = run([str(venv / "bin" / "python"), "-c", "import mio, mio.assets; print(mio.__file__); "
                 "print(mio.assets.BUNDLED.is_symlink())"], elsewhere, env).stdout.split()
    assert Path(where[0]).is_relative_to(purelib) and where[1] == "False"  # the wheel's copy, not the checkout

    assert "usage: mio demo" in run([mio, "demo", "--help"], elsewhere, env).stdout
    out = run([mio, "tokenize", "--spec", "tokenizers/tiny/seed.yaml",
               str(ROOT / "data_recipes" / "samples" / "images" / "cat.jpg")], elsewhere, env)
    [row] = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(row["codes"]) == 32 and "error" not in row
    out = run([mio, "bench", "prepare", "--set", "recording_s=60", "--set", "windows=3", "--set", "rows=16"],
              elsewhere, env)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "prepare" and figures["busy"]["rows"] == 16
