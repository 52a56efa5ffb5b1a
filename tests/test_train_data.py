"""What a stage trains on is what it logs, and what reading loses is never silent: the stage
mixtures' shares as the training loop logs them, and damaged shards, samples that do not decode
or render, and media longer than the context counted per dataset and reason, logged at every log
step, summed up at the end, written to mio_data_report.json, and stopping the stage past
data.max_error_fraction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from train_support import shared_root, tiny_args, write_dataset

from mio.data.reading import ERROR_REASONS, DataCounts
from mio.data.shards import AtomicShardWriter, StoredSample
from mio.data.tars import tar_writer
from mio.segments import Speech, Text
from mio.train.cli import fit
from mio.train.data import DATA_REPORT, MIN_ERRORS_TO_STOP, DataError, DataReport
from mio.vocab import MODALITY_NAMES, SPEECH_CODE

pytestmark = pytest.mark.slow  # each test trains a stage


class Trained(L.Callback):
    """(optimizer steps done, DataCounts) of every micro-batch trained, as the reader made them."""

    batches: list[tuple[int, DataCounts]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        Trained.batches.append((trainer.global_step, batch["data"]))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = shared_root(tmp_path_factory)
    broken = root / "data" / "broken"
    if not broken.is_dir():
        write_dataset(broken, "speech_text", samples=30, shards=2)
        shard = broken / "speech_text-00001.tar"
        shard.write_bytes(shard.read_bytes()[:6000])  # cut short: shard_truncated
        rng = np.random.default_rng(0)
        with AtomicShardWriter(broken / "speech_text-00002.tar") as w:
            for i in range(12):  # codes outside the speech codebook: render_failed
                w.write(StoredSample(f"bad-code-{i}", "speech_text", [Speech(rng.integers(1024, 2048, (4, 8))),
                                                                     Text("x")]))
            for i in range(6):  # 300 frames: over the 256-token context in both directions
                w.write(StoredSample(f"long-{i}", "speech_text", [Speech(rng.integers(0, 1024, (4, 300))), Text("x")]))
        with open(broken / "speech_text-00003.tar", "wb") as f:  # a json naming a member it lacks: bad_sample
            with tar_writer(f) as tar:
                tar.write({"__key__": "no-media", "json": json.dumps(
                    {"data_type": "speech_text", "segments": [{"speech": "m0.npy"}]}).encode()})
    return root


def test_the_tiny_stage_three_logs_the_share_it_trained_on(root, tmp_path):
    """The demo's stage III logged 66% speech against 75% (the loop drew without the packer's
    feedback, and the stage held 64 packs open): the loop now logs, log window by log window,
    exactly the shares of the micro-batches it trained on, and over the run they are the stage's."""
    Trained.batches = []
    every = 4
    fit(tiny_args(root, tmp_path, "--model.extend_vocab=true", f"--trainer.log_every_n_steps={every}",
                  "--trainer.callbacks+=test_train_data.Trained", config="3_speech.yaml", steps=2 * every,
                  context=1024))
    rows = [r for r in csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()) if r["train/loss"]]
    assert len(rows) == 2
    run = DataCounts(4)
    for row in rows:
        step = int(row["step"]) + 1  # optimizer steps done when Lightning logged the row
        window = DataCounts(4)
        for done, counts in Trained.batches:
            if step - every < done <= step:
                window.add(counts)
        run.add(window)
        real = window.tokens.sum()
        for m, name in MODALITY_NAMES.items():
            assert float(row[f"train/share_{name}"]) == pytest.approx(window.kind_tokens[m] / real, rel=1e-6)
        for d, name in enumerate(["image_text", "text", "interleaved", "speech_text"]):
            assert float(row[f"train/share/{name}"]) == pytest.approx(window.tokens[d] / real, rel=1e-6)
    assert abs(run.kind_tokens[SPEECH_CODE] / run.tokens.sum() - 0.75) <= 0.02, run.kind_tokens


BROKEN = ("--data.datasets=[{path: image_text, weight: 2}, {path: broken, weight: 1}]", "--data.val_fraction=0",
          "--trainer.log_every_n_steps=2",
          "--data.shuffle_buffer=64")


def test_every_loss_is_counted_logged_summed_up_and_reported(root, tmp_path, capfd):
    out = fit(tiny_args(root, tmp_path, *BROKEN, "--data.max_error_fraction=1.0", steps=6))
    rows = [r for r in csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # every log step (Lightning counts from 0)
    for reason in ERROR_REASONS:
        logged = [float(r[f"data/broken/{reason}"]) for r in rows]
        assert logged == sorted(logged)  # running totals
        assert all(float(r[f"data/image_text/{reason}"]) == 0 for r in rows)
    report = json.loads((tmp_path / DATA_REPORT).read_text())
    assert json.loads((out / DATA_REPORT).read_text()) == report  # also in the stage's model folder
    broken = report["datasets"]["broken"]
    assert all(broken["errors"][r] >= 1 for r in ERROR_REASONS if r != "shard_unreadable"), broken
    assert broken["errors"]["shard_unreadable"] == 0
    assert "speech_text-00001.tar" in broken["examples"]["shard_truncated"]
    assert "no-media" in broken["examples"]["bad_sample"]
    assert broken["examples"]["over_context"].startswith("long-")
    examples = broken["examples"]
    assert examples["render_failed"].startswith("bad-code-") and "outside its codebook" in examples["render_failed"]
    assert broken["errors"]["over_context"] >= float(rows[-1]["data/broken/over_context"])
    err = capfd.readouterr().err
    assert "[mio] data image_text: " in err and "no errors" in err
    summary = next(line for line in err.splitlines() if line.startswith("[mio] data broken: "))
    lost = {reason: n for reason, n in broken["errors"].items() if n}
    assert all(f"{reason} {n}" in summary for reason, n in lost.items())


def test_a_dataset_past_the_tolerance_stops_the_stage(root, tmp_path):
    with pytest.raises(DataError, match=r"dataset broken lost \d+ of the \d+ samples it read, over "
                                        r"data.max_error_fraction=0.05: .*; e.g. "):
        fit(tiny_args(root, tmp_path, *BROKEN, "--data.max_error_fraction=0.05", steps=6))
    assert json.loads((tmp_path / DATA_REPORT).read_text())["datasets"]["broken"]["samples_read"] > 0


def test_the_report_sums_ranks_and_holds_to_the_tolerance(tmp_path):
    report = DataReport(["a", "b"], max_error_fraction=0.1, out_dir=tmp_path)

    def step(errors: int) -> dict[str, float]:
        counts = DataCounts(2)
        counts.read[:] = [100, 25]
        counts.tokens[:] = [300, 100]
        counts.kind_tokens[:] = [100, 0, 300]
        for _ in range(errors):
            counts.error(1, "render_failed", "b-7: VocabError: speech code 1500")
        report.add(counts)
        return report.log(report.local_vector() * 2)  # two ranks with these counts

    metrics = step(2)  # 4 of 50 lost: past 0.1, but fewer than MIN_ERRORS_TO_STOP
    assert 4 < MIN_ERRORS_TO_STOP
    assert metrics["train/share_speech"] == 0.75 and metrics["train/share/a"] == 0.75
    assert metrics["data/b/render_failed"] == 4 and metrics["data/b/read"] == 50 and metrics["data/a/read"] == 200
    with pytest.raises(DataError, match=r"dataset b lost 12 of the 100 samples .* render_failed 12; "
                                        r"e.g. b-7: VocabError: speech code 1500"):
        step(4)  # 12 of 100 lost
    assert json.loads((tmp_path / DATA_REPORT).read_text())["datasets"]["b"]["errors"]["render_failed"] == 12
