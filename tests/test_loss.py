"""The packed loss gives every supervised token of the global batch the same weight."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from mio.train.loss import global_supervised_tokens, packed_loss

VOCAB = 53


def random_labels(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    return labels.masked_fill(torch.rand(rows, length, generator=generator) < 0.4, -100)


def test_single_micro_batch_equals_transformers_own_loss() -> None:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = random_labels(g, 3, 20)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ours = packed_loss(out.logits, labels, global_supervised_tokens([labels]))
    assert torch.allclose(ours, out.loss, atol=1e-6)


def test_gradient_accumulation_and_packing_do_not_change_a_token_weight() -> None:
    """Micro-batch losses over the global count add up to the whole-batch loss, gradients included,
    however unevenly supervised the micro-batches are."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, VOCAB, generator=g, requires_grad=True)
    ids = torch.randint(0, VOCAB, (6, 24), generator=g)
    labels = random_labels(g, 6, 24)
    labels[4:] = -100  # a micro-batch with no supervision at all
    labels[4, 5] = 7

    whole = packed_loss(weight[ids], labels, global_supervised_tokens([labels]))
    (whole_grad,) = torch.autograd.grad(whole, weight)

    micro = [slice(0, 1), slice(1, 4), slice(4, 6)]
    n_global = global_supervised_tokens([labels[s] for s in micro])
    assert n_global == (labels[:, 1:] != -100).sum()
    accumulated = sum(packed_loss(weight[ids[s]], labels[s], n_global) for s in micro)
    (acc_grad,) = torch.autograd.grad(accumulated, weight)
    assert torch.allclose(accumulated, whole, atol=1e-6)
    assert torch.allclose(acc_grad, whole_grad, atol=1e-7)
    # ...and both are the plain mean over all supervised tokens.
    reference = F.cross_entropy(weight[ids][:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(whole, reference, atol=1e-6)


def test_no_supervised_token_gives_zero_not_nan() -> None:
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.full((2, 5), -100)
    loss = packed_loss(logits, labels, global_supervised_tokens([labels]))
    assert loss.item() == 0.0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        packed_loss(torch.randn(2, 5, VOCAB), torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="no micro-batches"):
        global_supervised_tokens([])


def _count_on_rank(rank: int, world: int, port: int, results: mp.SimpleQueue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Rank r holds r+1 micro-batches with 3 supervised targets each.
        labels = torch.full((1, 6), -100)
        labels[0, 1:4] = 1
        results.put((rank, int(global_supervised_tokens([labels] * (rank + 1)))))
    finally:
        torch.distributed.destroy_process_group()


def test_count_is_all_reduced_over_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # CPU-only gloo: forking is safe and skips re-importing torch
    results = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_count_on_rank, args=(r, 2, port, results)) for r in range(2)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert dict(results.get() for _ in ranks) == {0: 9, 1: 9}  # 3 * (1 + 2) on every rank
