"""Reading prepared shards: node/worker split, per-epoch draws, batched text encoding, and the
stage mixtures' speech share measured in packed batches."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mio.bench.data import write_synthetic
from mio.data.reading import (DatasetSpec, MixtureBatches, ReaderSlot, Renderer, dataset_stream,
                              epoch_samples, measure_shares, reader_rng, split_shards)
from mio.vocab import VocabTable


@pytest.fixture(scope="module")
def table(text_tokenizer):
    return VocabTable.mio_default(len(text_tokenizer))


@pytest.mark.parametrize("n_shards,world,workers", [(5, 2, 3), (6, 2, 3), (7, 1, 2), (1, 3, 1)])
def test_slots_read_disjoint_samples_covering_the_dataset(tmp_path, n_shards, world, workers):
    shards = write_synthetic(tmp_path, "image_text", samples=7 * n_shards, shard_size=7)
    assert len(shards) == n_shards
    for epoch in (0, 1):
        seen: list[str] = []
        for rank, worker in itertools.product(range(world), range(workers)):
            slot = ReaderSlot(rank, world, worker, workers)
            seen += [s.key for s in epoch_samples(shards, slot, seed=3, epoch=epoch, errors=Counter())]
        assert len(seen) == len(set(seen)) == 7 * n_shards


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 4))
def test_split_shards_partitions(n_shards, world, workers):
    shards = [f"s{i}" for i in range(n_shards)]
    pieces = [split_shards(shards, ReaderSlot(r, world, w, workers))
              for r in range(world) for w in range(workers)]
    if n_shards >= world * workers:
        assert sorted(s for mine, _, _ in pieces for s in mine) == sorted(shards)
        assert all(stride == 1 for _, stride, _ in pieces)
    else:
        assert sorted(offset for _, _, offset in pieces) == list(range(world * workers))


def _generates(sample, table) -> bool:
    """Whether a rendered pair is in the generation direction: its media block ends it (before EOS)."""
    return int(sample.input_ids[-2]) == table.image_end


def _directions(stream, n: int, table) -> list[bool]:
    return [_generates(s, table) for s in itertools.islice(stream, n)]


def test_directions_redrawn_per_epoch_reproducible_and_per_rank(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "image_text", samples=300, shard_size=100)
    renderer, spec = Renderer(mio_tokenizer, table), DatasetSpec(str(tmp_path))

    def run(slot: ReaderSlot, seed: int = 0) -> dict[tuple[int, str], bool]:
        stream = dataset_stream(shards, spec, renderer, slot, seed, 0, Counter(), shuffle_buffer=16)
        out = {}
        for i, s in enumerate(itertools.islice(stream, 600)):
            out[(i // 300, s.key)] = _generates(s, table)  # (epoch, key) -> generation?
        return out

    a, b = run(ReaderSlot()), run(ReaderSlot())
    assert a == b  # reproducible
    keys = {k for _, k in a}
    changed = sum(a[(0, k)] != a[(1, k)] for k in keys) / len(keys)
    assert 0.35 < changed < 0.65  # drawn afresh each epoch, not fixed per sample
    assert 0.42 < np.mean(list(a.values())) < 0.58  # image-text: either direction, half each
    assert reader_rng(0, 0, 0, ReaderSlot(0, 2)).random() != reader_rng(0, 0, 0, ReaderSlot(1, 2)).random()
    assert reader_rng(0, 0, 0, ReaderSlot(0, 1, 0, 2)).random() != reader_rng(0, 0, 0, ReaderSlot(0, 1, 1, 2)).random()
    assert run(ReaderSlot(), seed=1) != a


def test_video_text_generates_video_sixty_percent(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "video_text", samples=500, shard_size=250)
    stream = dataset_stream(shards, DatasetSpec(str(tmp_path)), Renderer(mio_tokenizer, table), ReaderSlot(), 0, 0,
                            Counter())
    assert 0.54 < np.mean(_directions(stream, 1000, table)) < 0.66


def test_rendering_in_blocks_equals_one_by_one(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "speech_text", samples=40, shard_size=40)
    samples = list(epoch_samples(shards, ReaderSlot(), 0, 0, Counter()))
    renderer, spec = Renderer(mio_tokenizer, table), DatasetSpec(str(tmp_path))
    block = renderer.many(samples, spec, random.Random(5), Counter())
    rng = random.Random(5)
    single = [Renderer(mio_tokenizer, table)(s, spec, rng) for s in samples]
    assert all(np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
               for x, y in zip(block, single))


# Paper, Table 2: image-text : language : interleaved + video : speech-text batch ratios.
STAGES = {
    "I": ({"image_text": 12, "text": 2, "speech_text": 2}, 0.125),
    "II": ({"image_text": 2, "text": 2, "interleaved": 4, "video_text": 2, "speech_text": 6}, 0.375),
    "III": ({"image_text": 2, "text": 1, "interleaved": 1, "speech_text": 12}, 0.75),
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for data_type in ("image_text", "text", "interleaved", "video_text", "speech_text"):
        write_synthetic(root / data_type, data_type, samples=400, shard_size=100)
    return root


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_mixture_speech_share(stage, synthetic_root, mio_tokenizer, table):
    weights, target = STAGES[stage]
    specs = [DatasetSpec(name, weight=w) for name, w in weights.items()]
    mixture = MixtureBatches(specs, synthetic_root, mio_tokenizer, table, context_length=2800, batch_size=4)
    shares = measure_shares(mixture, batches=30, skip_batches=4)
    assert abs(shares["dataset_share"]["speech_text"] - target) <= 0.02, shares
    for name, w in weights.items():  # every dataset near its share, not only speech
        assert abs(shares["dataset_share"][name] - w / sum(weights.values())) <= 0.03, (name, shares)
    assert shares["packing_efficiency"] > 0.9
    assert shares["modality_share"]["speech"] < shares["dataset_share"]["speech_text"]  # transcripts are text


def test_sample_balance_misses_the_token_share(synthetic_root, mio_tokenizer, table):
    """Why the mixture balances tokens: balancing samples leaves speech-text far off its share."""
    weights, target = STAGES["III"]
    specs = [DatasetSpec(name, weight=w) for name, w in weights.items()]
    mixture = MixtureBatches(specs, synthetic_root, mio_tokenizer, table, 2800, 4, balance="samples")
    shares = measure_shares(mixture, batches=15)
    assert abs(shares["dataset_share"]["speech_text"] - target) > 0.03


def test_mixture_batches_are_packed(synthetic_root, mio_tokenizer, table):
    mixture = MixtureBatches([DatasetSpec("image_text"), DatasetSpec("speech_text")], synthetic_root,
                             mio_tokenizer, table, context_length=1024, batch_size=2)
    batch = next(iter(mixture))
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 1024
    assert set(batch) >= {"input_ids", "labels", "position_ids", "document_ids"}
    with pytest.raises(ValueError, match="weight must be positive"):
        DatasetSpec("x", weight=0)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        MixtureBatches([DatasetSpec("missing")], synthetic_root, mio_tokenizer, table, 64, 1)


def test_damaged_shard_is_counted_not_fatal(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "text", samples=20, shard_size=10)
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2])
    errors: Counter = Counter()
    keys = [s.key for s in epoch_samples(shards, ReaderSlot(), 0, 0, errors)]
    assert errors["bad_shard"] == 1 and 10 <= len(keys) < 20


def test_dataset_longer_than_the_context_is_an_error_not_a_hang(synthetic_root, mio_tokenizer, table):
    # Speech-text samples are media samples: over the context they are dropped, never cut.
    mixture = MixtureBatches([DatasetSpec("speech_text")], synthetic_root, mio_tokenizer, table,
                             context_length=8, batch_size=1)
    with pytest.raises(ValueError, match="speech_text: 1000 samples in a row are longer than data.context_length=8"):
        next(iter(mixture))
