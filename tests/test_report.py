"""`mio report`: stage folders found alone or as a chain, a resumed stage's log versions merged by
step, the figures per stage computed from the logged rows, the page written."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from mio.cli import main
from mio.report import find_stages, packing_efficiency, read_metrics, stage_figures

FIELDS = ["step", "train/loss", "train/loss_text", "train/loss_image", "train/loss_speech", "train/share_text",
          "train/share_image", "train/share_speech", "train/packing_efficiency", "train/tokens_per_sec", "lr-AdamW/pg1",
          "val/loss"]


def write_log(stage: Path, version: int, rows: list[dict[str, float]]) -> None:
    """A metrics.csv as Lightning's CSVLogger writes it: one row per logging call, blanks elsewhere."""
    folder = stage / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def step_rows(step: int, loss: float) -> list[dict[str, float]]:
    """The two rows of a logged step: the module's figures, then the learning-rate monitor's."""
    return [{"step": step, "train/loss": loss, "train/loss_text": loss + 1, "train/loss_image": loss - 1,
             "train/loss_speech": float("nan"), "train/share_text": 0.25, "train/share_image": 0.75,
             "train/share_speech": 0.0, "train/packing_efficiency": 0.5 + step / 100, "train/tokens_per_sec": 1000.0},
            {"step": step, "lr-AdamW/pg1": 1e-3 / (step + 1)}]


def test_a_resumed_stage_merges_its_log_versions_by_step(tmp_path):
    write_log(tmp_path, 0, [r for s in range(6) for r in step_rows(s, 10.0 - s)])  # killed after step 5...
    write_log(tmp_path, 1, [r for s in range(4, 8) for r in step_rows(s, 20.0 - s)])  # ...resumed from step 4
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(8))
    assert [r["train/loss"] for r in rows] == [10, 9, 8, 7, 16, 15, 14, 13]  # the resumed run's steps win
    assert all(r["lr-AdamW/pg1"] == 1e-3 / (r["step"] + 1) for r in rows)  # the rows of a step are one


def test_figures_and_page_of_a_chain_of_stages(tmp_path, capsys):
    write_log(tmp_path / "1_alignment", 0, [r for s in range(4) for r in step_rows(s, 5.0 - s)])
    write_log(tmp_path / "4_sft", 0, [r for s in range(2) for r in step_rows(s, 3.0 - s)] + [{"step": 1, "val/loss": 2.5}])
    (tmp_path / "data").mkdir()  # not a stage: left out
    stages = find_stages([tmp_path])
    assert [s.name for s in stages] == ["1_alignment", "4_sft"]
    figures = stage_figures(stages[0])
    assert figures["steps"] == 4 and figures["final loss"] == 2.0 and figures["final lr"] == 1e-3 / 4
    assert figures["packing efficiency"] == pytest.approx(0.515) and figures["image share"] == 0.75
    assert math.isnan(figures["final validation loss"]) and stage_figures(stages[1])["final validation loss"] == 2.5
    assert packing_efficiency(stages) == pytest.approx((0.5 + 0.51 + 0.52 + 0.53 + 0.5 + 0.51) / 6)
    assert main(["report", str(tmp_path)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == tmp_path / "report.html"
    html = page.read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 5  # loss, per modality, lr, shares, throughput
    assert "1_alignment" in html and "4_sft" in html
    # One stage folder alone, written where asked.
    assert main(["report", str(tmp_path / "4_sft"), "--out", str(tmp_path / "sft.html")]) == 0
    assert "4_sft" in (tmp_path / "sft.html").read_text() and "1_alignment" not in (tmp_path / "sft.html").read_text()


def test_a_folder_without_logs_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no training logs" in capsys.readouterr().err
