"""The pieces of `mio bench packing`: its sample mixture, its baseline and its timing run."""

from __future__ import annotations

import numpy as np
import torch

from mio.bench.packing import IMAGE_BEGIN, IMAGE_END, SPEECH_BEGIN, mixture, padded_efficiency, training_throughput
from mio.data.packing import BestFitPacker, TokenSample, modality_block_spans


def test_mixture_has_the_token_layout_of_mio_samples() -> None:
    samples = mixture(300, seed=1)
    for s in samples:
        assert len(s.input_ids) == len(s.labels) == len(s.modality)
        for a, b in modality_block_spans(s.modality):
            block = s.input_ids[a:b]
            if s.modality[a] == 1:  # images (video frames follow each other): <image> + 32 codes + </image>
                frames = block.reshape(-1, 34)
                assert (frames[:, 0] == IMAGE_BEGIN).all() and (frames[:, -1] == IMAGE_END).all()
            else:
                assert block[0] == SPEECH_BEGIN
        if s.text_only:  # language and interleaved documents: cuttable, speech-free
            assert not (s.modality == 2).any()
    pairs = [s for s in samples if not s.text_only and (s.modality == 1).sum() == 34]
    assert pairs and all(40 <= len(s.input_ids) <= 120 for s in pairs)
    too_long = [s for s in samples if len(s.input_ids) > 2800]
    assert any(s.text_only for s in too_long) and any(not s.text_only for s in too_long)


def test_padded_efficiency_counts_pad_to_longest() -> None:
    seqs = [TokenSample(np.ones(n, np.int64), np.ones(n, np.int64)) for n in (2, 4, 3, 3, 1)]
    # batches of 2: [2, 4] -> 8 slots, [3, 3] -> 6, [1] -> 1; 13 real tokens
    assert padded_efficiency(seqs, 2) == 13 / 15
    assert padded_efficiency(seqs, 1) == 1.0


def test_training_throughput_times_the_same_tokens_both_ways() -> None:
    sequences = list(BestFitPacker(128).sequences(mixture(20, seed=2)))[:6]
    out = training_throughput(sequences, 128, 8, 3, torch.device("cpu"), torch.float32)
    tokens = sum(len(s.input_ids) for s in sequences)
    assert out["timed_tokens"] == tokens and out["timed_samples"] == 6
    assert out["padded_micro_batches"] == 2  # 6 samples in micro-batches of 3
    # The packed side trains on the same tokens: its micro-batches hold every sequence's tokens once.
    packs = list(BestFitPacker(128, buffer_size=8)(sequences))
    assert sum(sum(p.seq_lens) for p in packs) == tokens
    assert out["packed_micro_batches"] == -(-len(packs) // out["packed_rows_per_micro_batch"])
    assert out["speedup_vs_padded"] > 0
