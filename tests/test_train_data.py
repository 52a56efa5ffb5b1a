"""What a stage trains on is what it logs, and what reading loses is never silent: the stage
mixtures' shares as the training loop logs them, and damaged shards, samples that do not decode
or render, and media longer than the context counted per dataset and reason, logged at every log
step, summed up at the end, written to mio_data_report.json, and stopping the stage past
data.max_error_fraction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mio.bench.data import DATA_TYPES, SHARE_BACKBONE, STAGES, corpus, stage_share, write_synthetic
from mio.data.reading import ERROR_REASONS, DataCounts
from mio.data.shards import AtomicShardWriter, StoredSample
from mio.data.tars import tar_writer
from mio.model.backbone import build_tiny_backbone
from mio.segments import Speech, Text
from mio.train.cli import fit
from mio.train.data import DATA_REPORT, MIN_ERRORS_TO_STOP, DataError, DataReport
from train_support import ROOT, shared_root, tiny_args, write_dataset


@pytest.fixture(scope="module")
def share_root(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shares")
    for data_type in DATA_TYPES:
        write_synthetic(root / "data" / data_type, data_type, samples=150, shard_size=50)
    return root / "data", build_tiny_backbone(corpus(), SHARE_BACKBONE, root / "base")


def test_the_training_loop_logs_the_stage_speech_share(share_root, tmp_path):
    """`mio fit` on the full-size stage III YAML (weights, templates, 2800-token context), 20 steps
    of one pack: the speech share it logs over the run is the stage table's 75%, every dataset is
    near its weight (the bench runs all three stages for 200 steps; tests/test_shards_reading.py
    checks the three mixtures in the reader's batches, whose counts are what the loop logs)."""
    data, base = share_root
    shares = stage_share("3_speech", data, base, tmp_path, steps=20)
    assert abs(shares["share_speech"] - STAGES["3_speech"]) <= 0.02, shares
    datasets = yaml.safe_load((ROOT / "stages" / "3_speech.yaml").read_text())["data"]["datasets"]
    total = sum(d["weight"] for d in datasets)
    for d in datasets:  # every dataset near its weight, not only speech
        assert abs(shares[f"share/{d['path']}"] - d["weight"] / total) <= 0.03, (d, shares)
    assert shares["share_text"] + shares["share_image"] + shares["share_speech"] == pytest.approx(1.0, abs=1e-3)


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


BROKEN = ("--data.datasets=[{path: image_text, weight: 2}, {path: broken, weight: 1}]", "--trainer.log_every_n_steps=2",
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
    assert "render" in broken["examples"]["render_failed"]
    assert broken["errors"]["over_context"] >= float(rows[-1]["data/broken/over_context"])
    err = capfd.readouterr().err
    assert "[mio] data image_text: " in err and "no errors" in err
    summary = next(line for line in err.splitlines() if line.startswith("[mio] data broken: "))
    assert all(f"{reason} {broken['errors'][reason]}" in summary for reason in ERROR_REASONS if broken["errors"][reason])


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
