"""Validation in every stage: held-out whole shards, the same packs every pass and on any number
of ranks, and a val/loss that is the token mean of the model's loss on those packs (checked
against per-sample forwards of the saved model). 1 vs 2 processes: test_train_distributed.py."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from train_support import ledger, tiny_base, write_dataset

from mio.data.reading import DatasetSpec
from mio.train.cli import fit
from mio.train.data import MioDataModule
from mio.train.validation import hold_out

pytestmark = pytest.mark.slow  # each test reads a stage's held-out packs through the data module


def test_hold_out_takes_whole_shards_deterministically():
    shards = [f"d/s-{i:02d}.tar" for i in range(10)]
    train, val = hold_out(shards, 0.2, seed=0, name="d")
    assert len(val) == 2 and sorted(train + val) == shards and not set(train) & set(val)
    assert hold_out(list(reversed(shards)), 0.2, seed=0, name="d") == (train, val)  # any listing order
    assert hold_out(shards, 0.01, seed=0, name="d")[1] != []  # at least one shard
    with pytest.raises(ValueError, match="dataset one: 1 shard"):
        hold_out(["one/s.tar"], 0.1, seed=0, name="one")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        hold_out(shards, 1.0, seed=0, name="d")


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("val")
    base = tiny_base(root / "base")
    write_dataset(root / "data" / "image_text", "image_text", samples=32, shards=4)
    write_dataset(root / "data" / "text", "text", samples=8)  # one shard: trains whole, not validated
    out = root / "run"
    args = ["--config", str(Path(__file__).parents[1] / "stages" / "tiny" / "1_alignment.yaml"),
            f"--model.backbone={base}", f"--data.root={root / 'data'}", f"--trainer.default_root_dir={out}",
            "--trainer.max_steps=4", "--data.context_length=256", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.datasets=[{path: image_text}, {path: text}]",
            "--data.val_fraction=0.25", "--data.val_packs=3", "--trainer.val_check_interval=2",
            "--trainer.check_val_every_n_epoch=null", "--trainer.log_every_n_steps=1",
            "--trainer.callbacks+=mio.train.callbacks.SampleLedger",
            # keep the best checkpoint by val/loss (no periodic ones: this test does not resume)
            "--checkpoint.every_n_train_steps=0", "--checkpoint.monitor=val/loss", "--checkpoint.mode=min"]
    fit(args)
    return root, out, args


def val_module(root: Path, backbone: Path, rank: int = 0, world: int = 1) -> MioDataModule:
    dm = MioDataModule([DatasetSpec("image_text"), DatasetSpec("text")], root=str(root / "data"), context_length=256,
                       batch_size=2, buffer_size=4, backbone=str(backbone), extend_vocab=True, val_fraction=0.25, val_packs=3)
    dm.setup("fit")
    return dm


def test_validation_reads_held_out_shards_the_same_every_pass(stage, capsys):
    root, out, _ = stage
    dm = val_module(root, root / "base")
    assert [s.path for s in dm.val_mixture.specs] == ["image_text"]  # the one-shard dataset is not held out
    first = [k for b in dm.val_batches(0, 1) for row in b["keys"] for k in row]
    assert {k.split("-")[0] for k in first} == {"image_text"}
    again = [k for b in dm.val_batches(0, 1) for row in b["keys"] for k in row]  # read afresh
    assert first == again and first
    trained = {k for line in ledger(out) for row in line["keys"] for k in row}
    assert trained and not trained & set(first)  # training never reads the held-out shard
    # Two ranks: their micro-batches together are the one-rank pass (the rank short of packs
    # gets an unsupervised row), as many on each rank.
    parts = [list(dm.val_batches(rank, 2)) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1])
    keys = [k for i in range(len(parts[0])) for p in parts for row in p[i]["keys"] for k in row]
    assert keys == first
    alone = MioDataModule([DatasetSpec("text")], root=str(root / "data"), context_length=256, backbone=str(root / "base"),
                          extend_vocab=True, val_fraction=0.25)
    alone.setup("fit")
    assert alone.val_mixture is None and "no validation: every dataset (one shard each)" in capsys.readouterr().err


def metrics(run: Path) -> list[dict[str, float]]:
    (path,) = sorted(run.glob("logs/version_*/metrics.csv"))
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def test_val_loss_is_the_token_mean_over_the_held_out_packs(stage):
    """The last pass (after the last step) scored the saved weights: its val/loss is the token
    mean of the saved model's loss on the pass's packs, computed sample by sample without packing."""
    from transformers import AutoModelForCausalLM

    root, out, _ = stage
    rows = [r for r in metrics(out) if "val/loss" in r]
    assert [r["step"] for r in rows] == [1, 3]  # every 2 training batches (steps 2 and 4, logged 0-based)
    assert all(not math.isnan(r["val/loss_image"]) and not math.isnan(r["val/loss_text"]) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    dm = val_module(root, out / "model")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_batches(0, 1):
            for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"]):
                for d in docs.unique().tolist():
                    if d < 0:
                        continue
                    sel = docs == d
                    logits = model(input_ids=ids[sel][None]).logits[0, :-1]
                    target = labels[sel][1:]
                    keep = target != -100
                    total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                    count += int(keep.sum())
    assert rows[-1]["val/loss"] == pytest.approx(total / count, rel=1e-4)
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(e)).Reload().Tags()["scalars"] for e in events))
    assert {"val/loss", "val/loss_image", "val/loss_text"} <= tags


def test_a_stage_keeps_its_best_checkpoint_by_val_loss(stage):
    _, out, _ = stage
    rows = [r for r in metrics(out) if "val/loss" in r]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt"]
    best = out / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    best_row = min(rows, key=lambda r: r["val/loss"])
    assert saved["global_step"] == best_row["step"] + 1  # the CSV's step is 0-based
