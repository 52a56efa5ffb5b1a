"""Parts of the training loop, without a Trainer: FLOPs per real sample, the global row order of the
training reader (independent of ranks and workers, resumable by skipping), activation
checkpointing, random state and settings in weights_only checkpoints."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from train_support import shared_root
from transformers import AutoTokenizer

from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.data.pipeline import RankBatches, RankRows
from mio.data.reading import DatasetSpec, Mixture
from mio.model.backbone import load_backbone
from mio.train.checkpoint import plain, rng_state, set_rng_state
from mio.train.flops import FlopCounts
from mio.train.module import MioModule
from mio.vocab import extend_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


# --- FLOPs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_flop_counts_match_a_flop_counter_on_one_sample(root):
    """The sizes read off the model give exactly the FLOPs torch counts for a forward and backward
    pass over one sample (eager attention computes the full s x s square, 12 = 2 x 2 x 3)."""
    model, _, _ = load_backbone(root / "base", attn_implementation="eager", extend=True)
    counts = FlopCounts.of(model)
    s = 37
    ids = torch.randint(0, 300, (1, s))
    with FlopCounterMode(display=False) as counter:
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        model.get_output_embeddings()(hidden).sum().backward()
    full_square_attention = 12 * counts.layers * counts.attention_width * s * s
    linear = 6 * counts.body_params * s + 6 * counts.head_params * s
    assert counter.get_total_flops() == linear + full_square_attention
    assert counts.layers == 2 and counts.attention_width == 64


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(1, 4), st.integers(0, 2**16))
def test_flops_are_per_sample_whatever_the_packing(lengths, rows, seed):
    """Packing the same samples into any rows gives the FLOPs of the samples one by one: attention
    grows with each sample's own length, not the pack's."""
    counts = FlopCounts(body_params=1000, head_params=500, layers=3, attention_width=16)
    rng = random.Random(seed)
    samples = [TokenSample(np.arange(n), np.arange(n)) for n in lengths]
    rng.shuffle(samples)
    packer = BestFitPacker(context_length=max(lengths) * 2, buffer_size=rows, seed=seed)
    batch = collate_packs(list(packer(samples)))
    found = batch["seq_lens"]
    assert sorted(found.tolist()) == sorted(lengths)
    one_by_one = sum(counts.step_flops(torch.tensor([n]), 0) for n in lengths)
    assert float(counts.step_flops(found, 0)) == pytest.approx(float(one_by_one), rel=1e-12)
    # Causal attention: s(s+1)/2 query-key pairs per sample, x 2 matmuls x 2 FLOPs x 3 passes.
    attention = sum(6 * 3 * 16 * n * (n + 1) for n in lengths)
    assert float(counts.step_flops(found, 7)) == pytest.approx(6 * 1000 * sum(lengths) + 6 * 500 * 7 + attention)


# --- the training reader ------------------------------------------------------------------------
def mixture(root) -> Mixture:
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    specs = [DatasetSpec("image_text", 3), DatasetSpec("text", 1), DatasetSpec("speech_text", 1)]
    return Mixture(specs, root / "data", tokenizer, extend_tokenizer(tokenizer),
                   context_length=192, buffer_size=4, seed=3, shuffle_buffer=8)


def take(batches, n: int) -> list[dict]:
    it = iter(batches)
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for k in ("input_ids", "labels", "position_ids", "document_ids", "modality"):
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_rows_do_not_depend_on_the_ranks_or_the_workers(root):
    m = mixture(root)
    one_rank = take(RankBatches(RankRows(m, first=0, count=4, streams=4)), 5)
    two_workers = take(RankBatches(RankRows(m, first=0, count=4, streams=4), num_workers=2), 5)
    same_batches(one_rank, two_workers)
    # What the workers read and lost reaches the main process with their rows.
    assert [b["data"].vector().tolist() for b in one_rank] == [b["data"].vector().tolist() for b in two_workers]
    # Two ranks of two rows each train on the rows of one rank with four, in the same order.
    halves = [take(RankBatches(RankRows(m, first=r * 2, count=2, streams=4)), 5) for r in (0, 1)]
    for whole, a, b in zip(one_rank, *halves):
        assert whole["keys"] == a["keys"] + b["keys"]
        torch.testing.assert_close(whole["input_ids"][:2, :a["input_ids"].shape[1]], a["input_ids"])
    # Every micro-batch carries the supervised count of its optimizer step's micro-batches.
    assert all(int(b["step_supervised"]) == int((b["labels"][:, 1:] != -100).sum()) for b in one_rank)


def test_skipping_resumes_every_stream_at_the_next_pack(root):
    m = mixture(root)
    full = take(RankBatches(RankRows(m, first=0, count=2, streams=2)), 6)
    resumed = take(RankBatches(RankRows(m, first=0, count=2, streams=2, skip=4)), 2)
    same_batches(full[4:], resumed)
    # What the skipped rows read comes with the first resumed batch: the stage's counts are whole.
    assert sum(b["data"].read.sum() for b in full) == sum(b["data"].read.sum() for b in resumed)
    assert [b["data"].tokens.tolist() for b in full[4:]] == [b["data"].tokens.tolist() for b in resumed]


def test_step_supervised_spans_the_accumulated_micro_batches(root):
    batches = take(RankBatches(RankRows(mixture(root), first=0, count=2, streams=2), accumulate=3), 6)
    for step in (batches[:3], batches[3:]):
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step)
        assert [int(b["step_supervised"]) for b in step] == [total] * 3


def test_workers_must_divide_the_rows(root):
    with pytest.raises(ValueError, match="num_workers .3. must divide data.batch_size .4."):
        RankBatches(RankRows(mixture(root), first=0, count=4, streams=4), num_workers=3)


# --- module pieces ---------------------------------------------------------------------------------
def batch_of(root) -> dict:
    return take(RankBatches(RankRows(mixture(root), first=0, count=2, streams=2)), 1)[0]


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_gradients(root):
    batch = batch_of(root)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the added tokens' rows are drawn at random
        module = MioModule(str(root / "base"), extend_vocab=True, gradient_checkpointing=checkpointing)
        module.load_weights()  # what configure_model does without a sharding strategy
        logits = module(batch).logits  # (N, V) at the supervised positions
        targets = batch["labels"][:, 1:]
        torch.nn.functional.cross_entropy(logits, targets[targets != -100]).backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_random_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    buf = io.BytesIO()
    torch.save({"rng": [rng_state()]}, buf)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True)["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@dataclass
class _Settings:
    rank: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj"])


def test_settings_become_plain_for_weights_only_loading():
    hparams = {"backbone": "b", "lora": _Settings(), "betas": (0.9, 0.95), "nothing": None}
    buf = io.BytesIO()
    torch.save(plain(hparams), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == {"backbone": "b", "lora": {"rank": 8, "targets": ["q_proj"]},
                                                  "betas": (0.9, 0.95), "nothing": None}
