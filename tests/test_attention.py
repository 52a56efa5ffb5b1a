"""The guard of masked packing: a packed batch gives each sample exactly what it gets alone.

For every backend available here: logits and loss of packed batches equal per-sample runs
(float32, max abs error <= 1e-4) on random lengths with length-1 samples, a pack holding one
full-length sample and packs padded at the end; gradients too, to 1e-4 of each parameter's
largest gradient (SDPA on CPU; FlexAttention and flash-attn where a GPU is).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.model.attention import (
    dense_document_causal_mask,
    document_causal_block_mask,
    hf_attn_implementation,
    packed_attention_kwargs,
    pad_multiple,
)
from mio.model.forward import supervised_positions
from mio.train.loss import micro_batch_loss, step_tokens, supervised_count, supervised_targets, token_cross_entropy

VOCAB = 101


def packed_loss(logits: torch.Tensor, labels: torch.Tensor, step_count: torch.Tensor) -> torch.Tensor:
    """The training loss (mio/train/loss.py) of (B, L, V) logits: their supervised positions only."""
    return micro_batch_loss(token_cross_entropy(logits[supervised_positions(labels)], supervised_targets(labels)),
                            step_count)
TOL = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_llama(attn_implementation: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The same random tiny Llama (GQA: 4 heads, 2 key/value heads) under any attention implementation."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.to(device=device, dtype=dtype)


def random_samples(seed: int, count: int, context: int) -> list[TokenSample]:
    """Random lengths with several length-1 samples and one sample of exactly the context length."""
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, context // 2, count)) + [1, 1, 2, context]
    rng.shuffle(lengths)
    samples = []
    for n in lengths:
        ids = rng.integers(1, VOCAB, n)
        labels = np.where(rng.random(n) < 0.7, ids, -100)
        samples.append(TokenSample(ids, labels))
    return samples


def packed_batch(seed: int, context: int, multiple: int, count: int = 12) -> tuple[dict, list[TokenSample]]:
    packer = BestFitPacker(context, buffer_size=4, pad_to_multiple_of=multiple)
    packs = list(packer(random_samples(seed, count, context)))
    # Rows of unequal fill: collate pads the shorter ones at the end.
    assert any(sum(p.seq_lens) < max(len(q.input_ids) for q in packs) for p in packs)
    assert any(p.seq_lens == [context] for p in packs)
    return collate_packs(packs), packs


def per_sample_segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, length) of every sample of a collated batch."""
    out = []
    for row, docs in enumerate(batch["document_ids"]):
        for d in range(int(docs.max()) + 1):
            where = torch.nonzero(docs == d).flatten()
            out.append((row, int(where[0]), len(where)))
    return out


def assert_packed_equals_alone(model: torch.nn.Module, reference: torch.nn.Module, backend: str, batch: dict) -> None:
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **packed_attention_kwargs(backend, batch)).logits
        n_global = step_tokens(supervised_count(batch["labels"]))
        packed = packed_loss(logits, batch["labels"], n_global)
        total, worst = 0.0, 0.0
        for row, start, n in per_sample_segments(batch):
            ids = batch["input_ids"][row : row + 1, start : start + n]
            labels = batch["labels"][row : row + 1, start : start + n]
            alone = reference(input_ids=ids).logits
            worst = max(worst, (alone - logits[row : row + 1, start : start + n]).abs().max().item())
            total += F.cross_entropy(alone[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
    assert worst <= TOL, f"{backend}: packed logits differ from per-sample logits by {worst}"
    assert abs(packed.item() - total / n_global.item()) <= TOL


@pytest.mark.slow
def test_position_ids_alone_leak_across_samples() -> None:
    """Why explicit masks exist: with restarted position ids but no mask, sdpa lets samples see each other."""
    model = tiny_llama("sdpa").eval()
    batch, _ = packed_batch(0, 64, 1)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        exact = model(input_ids=batch["input_ids"], **packed_attention_kwargs("sdpa", batch)).logits
    real = batch["document_ids"] >= 0
    assert (leaky - exact).abs()[real].max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_packed_logits_and_loss_equal_per_sample(seed: int) -> None:
    model = tiny_llama("sdpa").eval()
    batch, _ = packed_batch(seed, 64, 1)
    assert_packed_equals_alone(model, model, "sdpa", batch)



def assert_packed_gradients_equal_alone(packed_model, alone_model, backend: str, batch: dict) -> None:  # noqa: ANN001
    """One backward over the packed batch and one per sample alone, both divided by the same global
    token count, give the same gradients."""
    n_global = step_tokens(supervised_count(batch["labels"]))
    logits = packed_model(input_ids=batch["input_ids"], **packed_attention_kwargs(backend, batch)).logits
    packed_loss(logits, batch["labels"], n_global).backward()
    for row, start, n in per_sample_segments(batch):
        ids = batch["input_ids"][row : row + 1, start : start + n]
        labels = batch["labels"][row : row + 1, start : start + n]
        packed_loss(alone_model(input_ids=ids).logits, labels, n_global).backward()
    assert_same_gradients(packed_model, alone_model, TOL)

def test_sdpa_packed_gradients_equal_per_sample() -> None:
    batch, _ = packed_batch(2, 64, 1, count=6)
    packed_model, alone_model = tiny_llama("sdpa"), tiny_llama("sdpa")
    assert_packed_gradients_equal_alone(packed_model, alone_model, "sdpa", batch)


def assert_same_gradients(packed: torch.nn.Module, alone: torch.nn.Module, tol: float) -> None:
    """Every parameter's gradient agrees to ``tol`` relative to its largest entry (some attention
    gradients of a tiny random model are ~1e-4, so an absolute 1e-4 would prove nothing)."""
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        scale = q.grad.float().abs().max().item()
        err = (p.grad.float() - q.grad.float()).abs().max().item()
        assert scale > 0 and err <= tol * scale, f"gradient of {name} differs by {err} (largest entry {scale})"


@pytest.mark.slow
def test_flex_packed_logits_and_loss_equal_per_sample() -> None:
    """One compiled FlexAttention forward (CPU inductor) over padded packs of unequal fill."""
    model = tiny_llama(hf_attn_implementation("flex")).eval()
    reference = tiny_llama("sdpa").eval()
    batch, _ = packed_batch(3, 2 * pad_multiple("flex"), pad_multiple("flex"))
    assert batch["input_ids"].shape[1] % 128 == 0
    assert_packed_equals_alone(model, reference, "flex", batch)


@pytest.mark.parametrize("length, window", [(1, None), (5, None), (256, None), (300, None), (256, 100), (300, 7)])
def test_block_mask_matches_dense_mask_and_torch_reference(length: int, window: int | None) -> None:
    """Flex with our BlockMask equals SDPA with the dense mask (sliding windows too); on whole blocks
    its tables are torch's own."""
    rng = np.random.default_rng(length)
    cuts = np.sort(rng.choice(np.arange(1, length + 1), size=min(length, 6), replace=False))
    docs = np.full((2, length), -1, np.int64)
    for row, end in enumerate([cuts[-1], cuts[len(cuts) // 2]]):
        docs[row, :end] = np.searchsorted(cuts, np.arange(end), side="right")
    document_ids = torch.from_numpy(docs)
    dense = dense_document_causal_mask(document_ids, window)  # (B, 1, L, L)
    if window is not None:  # the window: what a transformers sliding layer sees (q - k < window)
        q_idx, k_idx = torch.arange(length)[:, None], torch.arange(length)[None, :]
        assert torch.equal(dense, dense_document_causal_mask(document_ids) & (q_idx - k_idx < window))
    ours = document_causal_block_mask(document_ids, window=window)
    if length % 128 == 0:
        reference = create_block_mask(lambda b, h, q, k: dense[b, 0, q, k], 2, None, length, length, device="cpu")
        assert torch.equal(ours.kv_num_blocks, reference.kv_num_blocks)
        assert torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks)
        assert torch.equal(ours.to_dense(), reference.to_dense())
    q, k, v = (torch.randn(2, 4, length, 8) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=ours)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert (out - ref).abs().max() <= 1e-5


def test_flex_training_on_cpu_is_refused_clearly() -> None:
    batch, _ = packed_batch(0, 64, 1)
    with pytest.raises(ValueError, match="no backward on CPU"):
        packed_attention_kwargs("flex", batch)
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_attention_kwargs("paged", batch)


@torch.no_grad()
def test_flex_and_flash_kwargs_hold_no_quadratic_tensor() -> None:
    length = 2816
    docs = torch.full((2, length), -1, dtype=torch.int32)
    docs[0, :2800] = torch.arange(2800) // 40
    docs[1, :1000] = 0
    batch = {"document_ids": docs, "position_ids": torch.zeros(2, length, dtype=torch.long),
             "input_ids": torch.zeros(2, length, dtype=torch.long),
             "cu_seqlens": torch.tensor([0, 2816, 3816, 5632], dtype=torch.int32), "max_seqlen": 2816}
    for backend in ("flex", "flash"):
        kwargs = packed_attention_kwargs(backend, batch)
        tensors = [t for v in kwargs.values() for t in (v.as_tuple() if hasattr(v, "as_tuple") else (v,))
                   if isinstance(t, torch.Tensor)]
        assert max(t.numel() for t in tensors) <= 2 * length * 2, backend
    assert packed_attention_kwargs("sdpa", batch)["attention_mask"].numel() == 2 * length * length


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None,
                                max_length_q=None, **kwargs):
    """flash_attn_varlen_func's contract in plain torch: causal attention inside each cu_seqlens segment
    of the flattened (B*L) batch. Stands in for flash-attn to check the kwargs reach the attention."""
    assert attention_mask is None and cu_seq_lens_q is not None and isinstance(max_length_q, int)
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.repeat_interleave(groups, 1).transpose(1, 2).reshape(batch * length, heads, dim)
    v = value.repeat_interleave(groups, 1).transpose(1, 2).reshape(batch * length, heads, dim)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (H, n, D)
        out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling).transpose(0, 1)
    return out.view(batch, length, heads, dim), None


@pytest.mark.slow
def test_flash_kwargs_isolate_samples_through_transformers() -> None:
    """The flash path's cu_seqlens kwargs travel through the model to the attention and isolate samples
    (a torch varlen function registered like flash-attn stands in for the kernel on CPU)."""
    AttentionInterface.register("mio_reference_varlen", _reference_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("mio_reference_varlen", flash_attention_mask)
    model = tiny_llama("mio_reference_varlen").eval()
    reference = tiny_llama("sdpa").eval()
    batch, _ = packed_batch(4, 64, 1)
    assert int(batch["cu_seqlens"][-1]) == batch["input_ids"].numel()
    assert_packed_equals_alone(model, reference, "flash", batch)


@pytest.mark.gpu
@cuda
def test_flex_packed_gradients_equal_per_sample_on_gpu() -> None:
    batch, _ = packed_batch(5, 256, 128)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    packed_model, alone_model = tiny_llama("flex_attention", "cuda"), tiny_llama("sdpa", "cuda")
    assert_packed_gradients_equal_alone(packed_model, alone_model, "flex", batch)


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_packed_equals_per_sample_on_gpu() -> None:
    """flash-attn runs in bf16 only: packed and alone both use it, so they agree to bf16 rounding."""
    batch, _ = packed_batch(6, 256, 1)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    packed_model = tiny_llama(hf_attn_implementation("flash"), "cuda", torch.bfloat16)
    alone_model = tiny_llama(hf_attn_implementation("flash"), "cuda", torch.bfloat16)
    n_global = step_tokens(supervised_count(batch["labels"]))
    logits = packed_model(input_ids=batch["input_ids"], **packed_attention_kwargs("flash", batch)).logits
    packed_loss(logits, batch["labels"], n_global).backward()
    for row, start, n in per_sample_segments(batch):
        ids = batch["input_ids"][row : row + 1, start : start + n]
        labels = batch["labels"][row : row + 1, start : start + n]
        alone = alone_model(input_ids=ids).logits
        assert (alone.float() - logits[row : row + 1, start : start + n].float()).abs().max().item() <= 5e-2
        packed_loss(alone, labels, n_global).backward()
    assert_same_gradients(packed_model, alone_model, 5e-2)
