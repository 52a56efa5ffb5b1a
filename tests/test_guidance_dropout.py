"""Condition dropout, the training side of classifier-free guidance.

- over 10,000 caption -> image samples the dropped share is within 1 point of p; a dropped
  sample's targets are byte-identical to the undropped sample's, its user turn is the pair task's
  template with the caption left empty (rendered apart, from the template); kept samples are
  unchanged;
- pretraining: only the generation direction's condition is dropped (to the named null text);
- the draw is a function of (sample key, epoch, run seed): one reader or two ranks drop the same
  keys, a new epoch draws again, and a resumed stream (rows skipped) continues the same packs;
- the counts ride with the data counts to ``train/cond_dropped/<dataset>``; p = 0 logs nothing.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from mio.bench.data import write_synthetic
from mio.data.packing import IGNORE_INDEX
from mio.data.pipeline import RankRows
from mio.data.reading import DataCounts, DatasetSpec, Mixture, ReaderSlot, TrainingRenderer, dataset_stream
from mio.data.shards import StoredSample
from mio.segments import Image, SegmentRenderer, Text
from mio.templates import PAIR_TASKS, ConditionDropout, condition_draw, pair_conversation, render_chat
from mio.train.data import DataReport, MioDataModule
from mio.vocab import VocabTable

TASK = "descriptive_image_generation"


@pytest.fixture(scope="module")
def table(text_tokenizer):
    return VocabTable.mio_default(len(text_tokenizer))


def pairs(n: int) -> list[StoredSample]:
    rng = np.random.default_rng(0)
    return [StoredSample(f"pair-{i:05d}", "image_text",
                         [Image(rng.integers(0, 8192, 32)), Text(f"a cat sitting on a mat number {i}")])
            for i in range(n)]


def render_all(renderer: TrainingRenderer, samples: list[StoredSample], spec: DatasetSpec, epoch: int = 0, seed: int = 0,
               cond: np.ndarray | None = None) -> list:
    out, rng = [], random.Random(1)
    for i in range(0, len(samples), 500):
        out += renderer.many(samples[i:i + 500], spec, rng, lambda s, e: pytest.fail(f"{s.key}: {e}"), epoch, seed,
                             cond)
    return out


def targets(sample) -> bytes:
    return sample.labels[sample.labels != IGNORE_INDEX].tobytes()


@pytest.mark.slow
def test_share_and_targets_over_ten_thousand_samples(mio_tokenizer, table):
    samples = pairs(10_000)
    renderer = TrainingRenderer(mio_tokenizer, table)
    p = 0.1
    dropping = DatasetSpec("d", format="sft", tasks=[TASK], cond_dropout={"image_generation": p})
    cond = np.zeros(2, np.int64)
    dropped_run = render_all(renderer, samples, dropping, epoch=0, seed=7, cond=cond)
    plain = render_all(renderer, samples, DatasetSpec("d", format="sft", tasks=[TASK]))
    assert cond[0] == len(samples)  # every sample asks for an image
    assert abs(cond[1] / cond[0] - p) < 0.01
    changed = [not np.array_equal(a.input_ids, b.input_ids) for a, b in zip(dropped_run, plain)]
    assert sum(changed) == cond[1]
    assert changed == [condition_draw(s.key, 0, 7) < p for s in samples]
    assert all(targets(a) == targets(b) for a, b in zip(dropped_run, plain))
    segment_renderer = SegmentRenderer(mio_tokenizer, table)
    for s, a, was in itertools.islice(zip(samples, dropped_run, changed), 200):
        if was:  # the user turn is the task's template with the caption left empty
            assert PAIR_TASKS[TASK].endswith("{text}")
            want = render_chat(pair_conversation(TASK, s.segments[0], ""), task=TASK)
            assert np.array_equal(a.input_ids, segment_renderer(want).input_ids)


def test_pretraining_drops_the_generation_direction_to_the_null_text(mio_tokenizer, table):
    samples = pairs(400)
    renderer = TrainingRenderer(mio_tokenizer, table)
    cond = np.zeros(2, np.int64)
    spec = DatasetSpec("d", cond_dropout={"image_generation": 1.0}, cond_null_text="nothing")
    dropped = render_all(renderer, samples, spec, cond=cond)
    plain = render_all(renderer, samples, DatasetSpec("d"))
    generating = [int(b.input_ids[-2]) == table.image_end for b in plain]  # the image ends it, before EOS
    assert 150 < sum(generating) < 250 and cond.tolist() == [sum(generating)] * 2
    for a, b, gen in zip(dropped, plain, generating):
        if not gen:  # captioning: nothing to drop
            assert np.array_equal(a.input_ids, b.input_ids)
            continue
        text = mio_tokenizer.decode(a.input_ids)
        assert 'Please generate an image of "nothing":' in text and "a cat" not in text
        block = 32 + 3  # <image>, the codes, </image>, EOS: the targets of the image
        assert a.input_ids[-block:].tobytes() == b.input_ids[-block:].tobytes()


def test_the_draw_depends_on_key_epoch_and_seed_only(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "image_text", samples=240, shard_size=60)
    renderer = TrainingRenderer(mio_tokenizer, table)
    spec = DatasetSpec(str(tmp_path), format="sft", tasks=[TASK], cond_dropout={"image_generation": 0.5})
    plain_spec = DatasetSpec(str(tmp_path), format="sft", tasks=[TASK])

    def dropped(slots: list[ReaderSlot], epoch: int = 0, seed: int = 3) -> set[str]:
        keys = set()
        for slot in slots:
            n = 240 // len(slots)
            a = itertools.islice(dataset_stream(shards, spec, renderer, slot, seed, 0, DataCounts(1)),
                                 epoch * n, (epoch + 1) * n)
            b = itertools.islice(dataset_stream(shards, plain_spec, renderer, slot, seed, 0, DataCounts(1)),
                                 epoch * n, (epoch + 1) * n)
            keys |= {x.key for x, y in zip(a, b) if not np.array_equal(x.input_ids, y.input_ids)}
        return keys

    one = dropped([ReaderSlot()])
    assert one == dropped([ReaderSlot(0, 2), ReaderSlot(1, 2)])  # another world size
    assert 80 < len(one) < 160
    assert dropped([ReaderSlot()], epoch=1) != one  # drawn again each epoch
    assert dropped([ReaderSlot()], seed=4) != one


def test_a_resumed_stream_and_the_logged_share(tmp_path, mio_tokenizer, table):
    write_synthetic(tmp_path / "pairs", "image_text", samples=200, shard_size=100)
    spec = DatasetSpec("pairs", format="sft", tasks=[TASK, "image_captioning"], cond_dropout={"image_generation": 0.3})
    mixture = Mixture([spec], tmp_path, mio_tokenizer, table, context_length=256, buffer_size=4, seed=5)
    rows = list(itertools.islice(iter(RankRows(mixture, 0, 1, 1)), 8))
    resumed = list(itertools.islice(iter(RankRows(mixture, 0, 1, 1, skip=3)), 5))
    assert [r.pack.keys for r in resumed] == [r.pack.keys for r in rows[3:]]
    assert all(np.array_equal(a.pack.input_ids, b.pack.input_ids) for a, b in zip(resumed, rows[3:]))
    total = DataCounts(1)
    for r in rows:
        total.add(r.counts)
    seen, dropped = total.cond[0]
    assert 0 < dropped < seen  # the generation samples (captioning ones are not counted)
    report = DataReport(["pairs"], 0.05, tmp_path)
    report.add(total)
    metrics = report.log(report.local_vector())
    assert metrics["train/cond_dropped/pairs"] == pytest.approx(dropped / seen)
    quiet = DataReport(["pairs"], 0.05, tmp_path)
    quiet.add(DataCounts(1))
    assert not any(k.startswith("train/cond_dropped") for k in quiet.log(quiet.local_vector()))


def test_the_stage_setting():
    dm = MioDataModule([DatasetSpec("a")], cond_dropout={"tts": 0.1}, cond_null_text="<none>")
    assert dm.datasets[0].condition_dropout == ConditionDropout({"tts": 0.1}, "<none>")
    assert not MioDataModule([DatasetSpec("a")]).datasets[0].condition_dropout.active  # default: off
    with pytest.raises(ValueError, match=r"data.cond_dropout: unknown task family \['image_caption'\]"):
        MioDataModule([DatasetSpec("a")], cond_dropout={"image_caption": 0.1})
    with pytest.raises(ValueError, match="must be in"):
        DatasetSpec("a", cond_dropout={"tts": 1.5})
