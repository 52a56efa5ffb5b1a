"""Restart and scale-out: a prepare killed mid-run and restarted equals an uninterrupted one, and
ranks (sequential, concurrent, from torchrun/SLURM env) give the same samples as one rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_support import snapshot, stalling_pipe

from mio.data import units as units_module
from mio.data.lock import LOCK
from mio.data.prepare import prepare
from mio.data.ranks import Ranks, resolve_ranks, unit_owner
from mio.data.shards import MANIFEST, iter_shard, list_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tokenizers" / "tiny"
WORDS = "the cat sat on a warm mat while rain fell over the quiet town".split()


def _text_input(folder: Path, parts: int, rows: int) -> None:
    for p in range(parts):
        with open(folder / f"part{p}.jsonl", "w") as fh:
            for i in range(rows):
                n = 3 + (i * 7 + p) % 40
                text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))
                fh.write(json.dumps({"text": f"{p}/{i}: {text}", "lang": "en" if i % 9 else "fr"}) + "\n")


def _recipe(folder: Path, shard_size: int, pattern: str = "part*.jsonl") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"data_type: text\nsource: words\ninput: '{pattern}'\nfields: {{text: text, language: lang}}\n"
                    f"filters: {{languages: [en]}}\nshard_size: {shard_size}\nbatch_size: 64\n")
    return path


@pytest.mark.slow
def test_killed_run_restarts_to_the_same_output(tmp_path):
    _text_input(tmp_path, parts=1, rows=10000)
    recipe = _recipe(tmp_path, shard_size=100)
    reference = prepare(recipe, tmp_path / "ref")
    assert len(reference["shards"]) == 100 and reference["skipped"] == {"language": 1112}

    out = tmp_path / "killed"
    read_end, write_end = stalling_pipe()  # a progress line per unit: blocked after a few dozen of 100
    child = subprocess.Popen([sys.executable, "-c", "import sys; from mio.data.prepare import prepare; "
                              "prepare(sys.argv[1], sys.argv[2], progress=lambda m: print(m, file=sys.stderr))",
                              str(recipe), str(out)], stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    deadline = time.time() + 120
    while len(list(out.glob("*.tar"))) < 5 and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    os.close(read_end)
    done = len(list(out.glob("*.tar")))
    assert 5 <= done < 100, f"the kill should land mid-run ({done} shards written)"
    assert not (out / MANIFEST).exists()

    records = len(list((out / ".units").glob("*.json")))
    assert (out / LOCK).is_file()  # SIGKILL left the lock behind: its process is gone, so it is stale
    said = []
    restarted = prepare(recipe, out, progress=said.append)
    assert any("removed a stale lock" in line and f"pid {child.pid}" in line for line in said), said
    assert any(f"{records} units already done" in line for line in said), said
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert restarted["samples"] == reference["samples"]
    keys = [s.key for shard in list_shards(out) for s in iter_shard(shard)]
    assert len(keys) == len(set(keys)) == reference["samples"]  # nothing lost, nothing twice
    assert not list(out.glob(".*.tmp"))


def test_rerun_skips_finished_units(tmp_path, monkeypatch):
    _text_input(tmp_path, parts=2, rows=300)
    recipe = _recipe(tmp_path, shard_size=100)
    first = prepare(recipe, tmp_path / "out")
    calls = []
    monkeypatch.setattr(units_module, "submit_batch", lambda *a: calls.append(a))
    again = prepare(recipe, tmp_path / "out")
    assert calls == [] and again == first


def test_an_error_mid_unit_loses_nothing(tmp_path, monkeypatch):
    _text_input(tmp_path, parts=1, rows=1000)
    recipe = _recipe(tmp_path, shard_size=100)
    prepare(recipe, tmp_path / "ref")
    real = units_module.complete_batch
    batches = []

    def failing(ctx, batch):
        batches.append(len(batch.rows))
        if len(batches) == 5:  # inside the third unit
            raise KeyboardInterrupt
        return real(ctx, batch)

    monkeypatch.setattr(units_module, "complete_batch", failing)
    with pytest.raises(KeyboardInterrupt, match="2 units .* run the same command to resume"):
        prepare(recipe, tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2
    monkeypatch.setattr(units_module, "complete_batch", real)
    prepare(recipe, tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")


def test_changed_recipe_refuses_to_mix(tmp_path):
    _text_input(tmp_path, parts=1, rows=50)
    recipe = _recipe(tmp_path, shard_size=10)
    prepare(recipe, tmp_path / "out")
    recipe.write_text(recipe.read_text().replace("shard_size: 10", "shard_size: 20"))
    with pytest.raises(ValueError, match="different recipe"):
        prepare(recipe, tmp_path / "out")


@pytest.mark.parametrize("parts,rows,shard_size", [(1, 700, 100), (5, 130, 50)])
def test_two_ranks_equal_one(tmp_path, parts, rows, shard_size):
    """One big input split by units, and many inputs split by whole parts."""
    _text_input(tmp_path, parts=parts, rows=rows)
    recipe = _recipe(tmp_path, shard_size=shard_size)
    prepare(recipe, tmp_path / "one")
    first = prepare(recipe, tmp_path / "two", rank=1, world_size=2)
    assert first["merged"] is False and first["samples"] > 0
    second = prepare(recipe, tmp_path / "two", rank=0, world_size=2)
    assert "merged" not in second
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    owners = {unit_owner(p, c, parts, 2) for p in range(parts) for c in range(rows // shard_size + 1)}
    assert owners == {0, 1}


@pytest.mark.slow
def test_concurrent_ranks_from_torchrun_env(tmp_path):
    _text_input(tmp_path, parts=3, rows=400)
    recipe = _recipe(tmp_path, shard_size=100)
    prepare(recipe, tmp_path / "one")
    procs = []
    for rank in range(2):  # the variables torchrun sets: the two ranks are one job and share the folder's lock
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "test-job"}
        procs.append(subprocess.Popen([sys.executable, "-m", "mio.cli", "prepare", str(recipe), "--out",
                                       str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_rank_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_ranks() == Ranks(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert resolve_ranks() == Ranks(5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_ranks() == Ranks(2, 4, 0)  # torchrun's variables win
    assert resolve_ranks(rank=1, world_size=3) == Ranks(1, 3, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4"):
        resolve_ranks()


@pytest.mark.slow
def test_media_two_ranks_equal_one(tmp_path):
    """Image tokenization batches within units, so rank count cannot change a code."""
    samples = ROOT / "data_recipes" / "samples"
    shutil.copytree(samples / "images", tmp_path / "images")
    rows = (samples / "image_text.jsonl").read_text().splitlines()[:7]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data_type: image_text\ninput: rows.jsonl\nfields: {text: caption}\n"
                      "tokenizers: {image: seed.yaml}\nshard_size: 3\nbatch_size: 2\n")
    prepare(recipe, tmp_path / "one", tokenizer_dir=TINY)
    for rank in (0, 1):
        prepare(recipe, tmp_path / "two", tokenizer_dir=TINY, rank=rank, world_size=2)
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_out_folder_of_another_dataset_is_refused(tmp_path):
    _text_input(tmp_path, parts=1, rows=5)
    prepare(_recipe(tmp_path, shard_size=10), tmp_path / "out")
    other = tmp_path / "other.yaml"
    other.write_text("data_type: text\ninput: part0.jsonl\n")
    with pytest.raises(ValueError, match="another dataset"):
        prepare(other, tmp_path / "out")
