"""`mio inspect`: manifest figures, skip reasons with an example each, checksums verified, samples
as stored and as rendered for training."""

from __future__ import annotations

import json
from pathlib import Path

from mio.cli import main
from mio.data.inspect import inspect_dataset
from mio.data.prepare import prepare


def _dataset(tmp_path: Path) -> Path:
    rows = [{"text": f"sentence number {i} about a cat"} for i in range(5)] + [{"txt": "wrong field"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    (tmp_path / "r.yaml").write_text("data_type: text\ninput: t.jsonl\nshard_size: 2\n")
    prepare(tmp_path / "r.yaml", tmp_path / "out")
    return tmp_path / "out"


def test_inspect_figures_samples_and_verify(tmp_path, tiny_base, capsys):
    out = _dataset(tmp_path)
    report = inspect_dataset(out, samples=2, backbone=tiny_base)
    assert "text from r: 5 samples of 7 rows seen, 3 shards" in report
    assert "skipped: bad_json 1, missing_field 1" in report and "t.jsonl:7" in report
    assert report.count("\n- r-00000-") == 2 and report.count("rendered: ") == 2
    assert '"sentence number 0 about a cat"' in report
    assert main(["inspect", str(out), "--samples", "0", "--verify"]) == 0
    assert "verify: all shards match the manifest" in capsys.readouterr().out
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert main(["inspect", str(out), "--samples", "0", "--verify"]) == 1  # the exit status tells the truth
    assert f"{shard.name}: checksum differs" in capsys.readouterr().out


def test_cli_prepare_and_inspect(tmp_path, capsys):
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3))
    (tmp_path / "t.jsonl").write_text(rows)
    (tmp_path / "r.yaml").write_text("data_type: text\ninput: t.jsonl\n")
    assert main(["prepare", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert main(["inspect", str(tmp_path / "out"), "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 samples of 3 rows seen" in printed and '"row 0"' in printed
    assert main(["prepare", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_inspect_of_a_folder_that_is_not_there_or_not_finished(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    (tmp_path / "half").mkdir()  # a prepare still under way writes its manifest last
    assert main(["inspect", str(tmp_path / "half")]) == 2
    assert "has no manifest (is `mio prepare` still running on it?)" in capsys.readouterr().err
