"""Property tests of the best-fit packer and unit tests of cutting, collating and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mio.data.packing import (
    BestFitPacker,
    TokenSample,
    collate_packs,
    cut_points,
    modality_block_spans,
)

TEXT, IMAGE, SPEECH = 0, 1, 2


@st.composite
def samples(draw: st.DrawFn, context: int) -> list[TokenSample]:
    """Samples of text runs and media blocks, up to twice the context; every token id unique."""
    counter = itertools.count(1)
    out = []
    for _ in range(draw(st.integers(0, 20))):
        runs = draw(st.lists(st.tuples(st.sampled_from([TEXT, IMAGE, SPEECH]), st.integers(1, context)),
                             max_size=4))
        modality = np.concatenate([np.full(n, m, np.int8) for m, n in runs]) if runs else np.zeros(0, np.int8)
        n = len(modality)
        ids = np.array([next(counter) for _ in range(n)], dtype=np.int64)
        supervised = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        out.append(TokenSample(ids, np.where(supervised, ids, -100), text_only=draw(st.booleans()),
                               modality=modality, key=f"s{len(out)}"))
    return out


def unsplittable(sample: TokenSample, context: int) -> bool:
    return any(b - a > context for a, b in modality_block_spans(sample.modality))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), context=st.integers(4, 48), buffer_size=st.integers(1, 6), multiple=st.sampled_from([1, 8]))
def test_packer_keeps_every_token_once_in_order_within_context(data, context, buffer_size, multiple) -> None:
    batch = data.draw(samples(context))
    packer = BestFitPacker(context, buffer_size=buffer_size, pad_to_multiple_of=multiple, pad_id=0)
    packs = list(packer(iter(batch)))
    by_id = {int(i): (k, j) for k, s in enumerate(batch) for j, i in enumerate(s.input_ids)}
    seen: dict[int, list[np.ndarray]] = {}
    for pack in packs:
        used = sum(pack.seq_lens)
        assert 0 < used <= context
        assert len(pack.input_ids) == -(-used // multiple) * multiple
        assert all(len(a) == len(pack.input_ids) for a in (pack.labels, pack.position_ids, pack.document_ids,
                                                            pack.modality))
        assert (pack.labels[used:] == -100).all() and (pack.document_ids[used:] == -1).all()
        assert (pack.input_ids[used:] == 0).all() and (pack.modality[used:] == -1).all()
        start = 0
        for d, n in enumerate(pack.seq_lens):
            ids = pack.input_ids[start : start + n]
            k, j = by_id[int(ids[0])]
            sample = batch[k]
            # A whole sample or a contiguous piece of one, in order, with its own labels and modality.
            assert np.array_equal(ids, sample.input_ids[j : j + n])
            assert np.array_equal(pack.modality[start : start + n], sample.modality[j : j + n])
            assert pack.labels[start] == -100  # nothing predicts a sample's first token across a boundary
            assert np.array_equal(pack.labels[start + 1 : start + n], sample.labels[j + 1 : j + n])
            assert np.array_equal(pack.position_ids[start : start + n], np.arange(n))
            assert (pack.document_ids[start : start + n] == d).all()
            seen.setdefault(k, []).append(ids)
            start += n
    stats = packer.stats
    for k, sample in enumerate(batch):
        n = len(sample.input_ids)
        dropped = n == 0 or (n > context and (not sample.text_only or unsplittable(sample, context)))
        if dropped:
            assert k not in seen
            continue
        pieces = sorted(seen[k], key=lambda a: a[0])
        assert np.array_equal(np.concatenate(pieces), sample.input_ids)  # no token lost or duplicated
        assert len(pieces) == 1 or n > context
        cuts = np.cumsum([len(p) for p in pieces])[:-1]
        for a, b in modality_block_spans(sample.modality):
            assert not ((cuts > a) & (cuts < b)).any(), "a cut split a media block"
    assert stats.samples_in == len(batch)
    assert stats.samples_packed + stats.samples_dropped_too_long + stats.samples_dropped_empty == len(batch)
    assert stats.samples_packed == len(seen)
    assert stats.samples_cut == sum(len(v) > 1 for v in seen.values())
    assert stats.packs == len(packs)
    assert stats.tokens == sum(sum(p.seq_lens) for p in packs)
    assert stats.pad_tokens == sum(len(p.input_ids) - sum(p.seq_lens) for p in packs)
    assert stats.sequences == sum(len(p.seq_lens) for p in packs)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), seed=st.integers(0, 3))
def test_packer_is_deterministic(data, seed) -> None:
    batch = data.draw(samples(24))
    first = list(BestFitPacker(24, buffer_size=3, seed=seed)(batch))
    again = list(BestFitPacker(24, buffer_size=3, seed=seed)(batch))
    assert len(first) == len(again)
    for a, b in zip(first, again):
        assert a.seq_lens == b.seq_lens and np.array_equal(a.input_ids, b.input_ids)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), rows=st.integers(1, 4))
def test_collate_stacks_packs_and_segments_cover_the_flat_batch(data, rows) -> None:
    packs = list(BestFitPacker(32, buffer_size=2)(data.draw(samples(32))))[:rows]
    if not packs:
        return
    batch = collate_packs(packs)
    length = max(len(p.input_ids) for p in packs)
    assert batch["input_ids"].shape == (len(packs), length)
    cu = batch["cu_seqlens"].numpy()
    assert cu[0] == 0 and cu[-1] == len(packs) * length and (np.diff(cu) > 0).all()
    assert batch["max_seqlen"] == np.diff(cu).max()
    # Each row's segments: its samples, then its padding (if any) as one segment.
    expected = [n for p in packs for n in p.seq_lens + ([length - sum(p.seq_lens)] * (sum(p.seq_lens) < length))]
    assert np.diff(cu).tolist() == expected
    for row, pack in enumerate(packs):
        n = len(pack.input_ids)
        assert np.array_equal(batch["input_ids"][row, :n].numpy(), pack.input_ids)
        assert (batch["labels"][row, n:] == -100).all() and (batch["document_ids"][row, n:] == -1).all()


def test_best_fit_fills_the_tightest_gap_and_releases_full_packs() -> None:
    lens = [6, 7, 3, 4]  # context 10: 6 and 7 open two packs; 3 fits 7 exactly -> released; 4 fits 6 exactly
    batch = [TokenSample(np.arange(n) + 1, np.arange(n) + 1) for n in lens]
    packs = list(BestFitPacker(10, buffer_size=8)(batch))
    assert [p.seq_lens for p in packs] == [[7, 3], [6, 4]]


def test_text_is_cut_outside_media_blocks_and_media_samples_are_dropped() -> None:
    # text 6, image block 5 (tokens 6..10), text 9: a cut at 8 would split the image, so it moves to 6.
    modality = np.array([0] * 6 + [1] * 5 + [0] * 9, np.int8)
    ids = np.arange(20) + 1
    long_text = TokenSample(ids, ids, text_only=True, modality=modality)
    long_media = TokenSample(ids, ids, text_only=False, modality=modality)
    packer = BestFitPacker(8, buffer_size=1)
    packs = list(packer([long_text, long_media]))
    assert sorted(n for p in packs for n in p.seq_lens) == [6, 6, 8]
    assert packer.stats.samples_cut == 1 and packer.stats.samples_dropped_too_long == 1
    assert cut_points(20, 4, modality_block_spans(modality)) is None  # the image alone is over the context


def test_block_spans_and_cut_points() -> None:
    modality = np.array([0, 0, 1, 1, 1, 1, 0, 2, 2, 2, 0, 1, 1], np.int8)  # the last block runs to the end
    spans = modality_block_spans(modality)
    assert spans.tolist() == [[2, 6], [7, 10], [11, 13]]
    assert cut_points(len(modality), 5, spans) == [2, 7, 11, 13]
    assert cut_points(9, 20, spans) == [9]


def test_packer_keeps_media_blocks_of_a_cut_sample_whole() -> None:
    ids = np.array([1, 2, 90, 5, 5, 91, 3, 90, 6, 91, 4])
    modality = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0], np.int8)
    packer = BestFitPacker(5, buffer_size=1)
    packs = list(packer([TokenSample(ids, ids, text_only=True, modality=modality)]))
    assert sorted(p.input_ids.tolist() for p in packs) == [[1, 2], [90, 5, 5, 91, 3], [90, 6, 91, 4]]


@pytest.mark.parametrize(
    "sample, message",
    [
        (TokenSample(np.arange(4), np.arange(3), key="shard-7/00042"), "shard-7/00042"),
        (TokenSample(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64)), "1-D"),
        (TokenSample(np.zeros(3), np.zeros(3)), "integers"),
        (TokenSample(np.arange(3), np.arange(3), modality=np.zeros(2, np.int8)), "modality"),
    ],
)
def test_bad_samples_raise_a_clear_error(sample: TokenSample, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(BestFitPacker(8)([sample]))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="context_length"):
        BestFitPacker(0)
    with pytest.raises(ValueError, match="no packs"):
        collate_packs([])
