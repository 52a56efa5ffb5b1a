"""Reading prepared shards: node/worker split, per-epoch draws, batched text encoding, the stage
mixtures' shares in the training reader's batches, and what reading loses, counted per dataset."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mio.bench.data import DATA_TYPES, STAGES, stage_datasets, write_synthetic
from mio.data.pipeline import RankBatches, RankRows
from mio.data.reading import (
    ERROR_REASONS,
    DataCounts,
    DatasetSpec,
    Mixture,
    ReaderSlot,
    TrainingRenderer,
    dataset_stream,
    epoch_samples,
    reader_rng,
    split_shards,
)
from mio.vocab import SPEECH_CODE, VocabTable


@pytest.fixture(scope="module")
def table(text_tokenizer):
    return VocabTable.mio_default(len(text_tokenizer))


@pytest.mark.parametrize("n_shards,world,workers", [(5, 2, 3), (6, 2, 3), (7, 1, 2), (1, 3, 1)])
def test_slots_read_disjoint_samples_covering_the_dataset(tmp_path, n_shards, world, workers):
    shards = write_synthetic(tmp_path, "image_text", samples=7 * n_shards, shard_size=7)
    assert len(shards) == n_shards
    for epoch in (0, 1):
        seen: list[str] = []
        counts = DataCounts(1)
        for rank, worker in itertools.product(range(world), range(workers)):
            slot = ReaderSlot(rank, world, worker, workers)
            seen += [s.key for s in epoch_samples(shards, slot, seed=3, epoch=epoch, counts=counts)]
        assert len(seen) == len(set(seen)) == 7 * n_shards == counts.read[0]


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
    renderer, spec = TrainingRenderer(mio_tokenizer, table), DatasetSpec(str(tmp_path))

    def run(slot: ReaderSlot, seed: int = 0) -> dict[tuple[int, str], bool]:
        stream = dataset_stream(shards, spec, renderer, slot, seed, 0, DataCounts(1), shuffle_buffer=16)
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
    stream = dataset_stream(shards, DatasetSpec(str(tmp_path)), TrainingRenderer(mio_tokenizer, table), ReaderSlot(), 0, 0,
                            DataCounts(1))
    assert 0.54 < np.mean(_directions(stream, 1000, table)) < 0.66


def test_rendering_in_blocks_equals_one_by_one(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "speech_text", samples=40, shard_size=40)
    samples = list(epoch_samples(shards, ReaderSlot(), 0, 0, DataCounts(1)))
    renderer, spec = TrainingRenderer(mio_tokenizer, table), DatasetSpec(str(tmp_path))
    failed: list = []
    block = renderer.many(samples, spec, random.Random(5), lambda sample, error: failed.append(sample.key))
    assert not failed and len(block) == len(samples) == 40
    rng = random.Random(5)
    single = [TrainingRenderer(mio_tokenizer, table)(s, spec, rng) for s in samples]
    assert all(np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
               for x, y in zip(block, single))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for data_type in DATA_TYPES:
        write_synthetic(root / data_type, data_type, samples=200, shard_size=100)
    return root


def read_batches(mixture: Mixture, rows: int, batches: int) -> tuple[list[dict], DataCounts]:
    """``batches`` micro-batches of ``rows`` row streams from the training reader, and their counts."""
    out = list(itertools.islice(RankBatches(RankRows(mixture, first=0, count=rows, streams=rows)), batches))
    counts = DataCounts(len(mixture.specs))
    for b in out:
        counts.add(b["data"])
    return out, counts


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_mixture_shares_in_the_training_batches(stage, synthetic_root, mio_tokenizer, table):
    """The full-size stage YAMLs' mixtures (weights, templates, context) in the reader's batches:
    the counts the training loop logs as train/share_*; the bench measures them over 200 steps."""
    _, specs, data = stage_datasets(stage, synthetic_root)
    mixture = Mixture(specs, synthetic_root, mio_tokenizer, table, data["context_length"], data["buffer_size"])
    batches, counts = read_batches(mixture, rows=1, batches=40)  # 40 packs of one row stream
    real = int(sum((b["document_ids"] >= 0).sum() for b in batches))
    assert counts.tokens.sum() == counts.kind_tokens.sum() == real  # every token of the batches, attributed once
    shares = counts.tokens / real
    total = sum(s.weight for s in specs)
    for spec, share in zip(specs, shares):  # every dataset near its share, not only speech
        assert abs(share - spec.weight / total) <= 0.03, (spec.path, shares)
    # The share of tokens in speech samples is speech-text's share: what the stage table means.
    assert abs(counts.kind_tokens[SPEECH_CODE] / real - STAGES[stage]) <= 0.02
    speech = [i for i, s in enumerate(specs) if s.path.startswith("speech_text")]
    assert counts.kind_tokens[SPEECH_CODE] == counts.tokens[speech].sum()
    speech_codes = sum(int(((b["modality"] == SPEECH_CODE) & (b["document_ids"] >= 0)).sum()) for b in batches)
    assert speech_codes < counts.kind_tokens[SPEECH_CODE]  # transcripts are text


def test_sample_balance_misses_the_token_share(synthetic_root, mio_tokenizer, table):
    """Why the mixture balances tokens: balancing samples leaves speech-text far off its share."""
    _, specs, data = stage_datasets("3_speech", synthetic_root)
    mixture = Mixture(specs, synthetic_root, mio_tokenizer, table, data["context_length"], data["buffer_size"],
                      balance="samples")
    _, counts = read_batches(mixture, rows=2, batches=10)
    assert abs(counts.kind_tokens[SPEECH_CODE] / counts.tokens.sum() - STAGES["3_speech"]) > 0.03


def test_training_batches_are_packed(synthetic_root, mio_tokenizer, table):
    mixture = Mixture([DatasetSpec("image_text"), DatasetSpec("speech_text")], synthetic_root, mio_tokenizer, table,
                      context_length=1024)
    (batch,), _ = read_batches(mixture, rows=2, batches=1)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 1024
    assert set(batch) >= {"input_ids", "labels", "position_ids", "document_ids", "data"}
    with pytest.raises(ValueError, match="weight must be positive"):
        DatasetSpec("x", weight=0)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        Mixture([DatasetSpec("missing")], synthetic_root, mio_tokenizer, table, 64)


def test_damaged_shard_is_counted_not_fatal(tmp_path, mio_tokenizer, table):
    shards = write_synthetic(tmp_path, "text", samples=20, shard_size=10)
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2])
    counts = DataCounts(2)
    keys = [s.key for s in epoch_samples(shards, ReaderSlot(), 0, 0, counts, dataset=1)]
    assert counts.errors[1, ERROR_REASONS.index("shard_truncated")] == 1 and counts.errors.sum() == 1
    assert 10 <= len(keys) == counts.read[1] < 20
    assert counts.examples[(1, ERROR_REASONS.index("shard_truncated"))].startswith(shards[1])


def test_dataset_longer_than_the_context_is_an_error_not_a_hang(synthetic_root, mio_tokenizer, table):
    # Speech-text samples are media samples: over the context they are dropped, never cut.
    mixture = Mixture([DatasetSpec("speech_text")], synthetic_root, mio_tokenizer, table, context_length=8)
    with pytest.raises(ValueError, match="speech_text: 1000 samples in a row are longer than data.context_length=8"):
        next(mixture.rows(ReaderSlot()))
