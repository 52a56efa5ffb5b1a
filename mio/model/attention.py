"""Per-sample attention isolation for packed batches, on every attention backend.

A packed row holds several samples; each token may attend only to earlier tokens of its own
sample. Position ids alone do not give that in transformers (they only restart the rotary
positions: under sdpa, eager and flex the samples still see each other), so every backend gets
an explicit description of the sample boundaries:

- ``sdpa``: a 4D boolean block-diagonal causal mask (B, 1, L, L). The reference; O(L^2) memory.
- ``eager``: the same mask as additive float (0 / dtype minimum), which transformers' eager
  attention adds to its scores; for families with no SDPA path (Gemma 2, ...).
- ``flex``: a FlexAttention ``BlockMask`` built from per-block document ranges: O(L) token data
  plus O((L/128)^2) block tables, never an (L, L) tensor. Any length is exact; packs padded to
  a multiple of 128 (``pad_multiple("flex")``) fill whole blocks, which is what the kernels expect.
  In torch 2.11 FlexAttention has no backward on CPU, so train on CPU with ``sdpa``.
- ``flash``: flash-attn's varlen kernel with ``cu_seqlens`` over the flattened batch (GPU, needs
  the ``flash-attn`` package): O(number of samples) metadata.

A mask given to a transformers model replaces the one it would build, sliding windows included,
so the masks carry the model's windows themselves (:func:`attention_windows`): one mask per
attention layer type (``{"full_attention": ..., "sliding_attention": ...}``, which transformers'
decoders accept for models with several) where each sliding layer sees only its last ``window``
keys. flash-attn applies the windows itself. Rows that hold one sample each (``data.pack:
false``) need no isolation: they get the plain 2D padding mask every family takes.

Padding forms its own segment at the end of each row (it attends causally within the padding),
so no query row is fully masked and no NaN can appear, on any backend.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from mio.userio import MioUserError

BACKENDS = ("sdpa", "eager", "flex", "flash")
FLEX_BLOCK_SIZE = 128
FULL = "full_attention"

_HF_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention", "flash": "flash_attention_2"}
_PAD_MULTIPLE = {"sdpa": 1, "eager": 1, "flex": FLEX_BLOCK_SIZE, "flash": 1}
# Layer types of transformers configs (``config.layer_types``) that attend over keys causally.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise MioUserError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def hf_attn_implementation(backend: str) -> str:
    """The ``attn_implementation`` to give ``from_pretrained`` / ``from_config`` for a backend."""
    _check_backend(backend)
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise MioUserError("attention backend 'flash' needs the flash-attn package (pip install 'mio[gpu]') and a GPU")
    return _HF_IMPLEMENTATIONS[backend]


def effective_backend(model: Any, backend: str) -> str:
    """The backend a loaded model runs: ``eager`` where ``sdpa`` was asked of a family that has no SDPA
    path (``load_backbone`` loaded it with eager attention and said so)."""
    _check_backend(backend)
    if backend == "sdpa" and model.get_correct_attn_implementation(None) == "eager":
        return "eager"
    return backend


def pad_multiple(backend: str) -> int:
    """The ``pad_to_multiple_of`` a packer should use for a backend."""
    _check_backend(backend)
    return _PAD_MULTIPLE[backend]


def attention_windows(config: Any) -> dict[str, int | None]:
    """Each attention layer type of a model -> how many of the latest keys its queries see (None: all).

    From the standard config fields: ``layer_types`` (``full_attention`` / ``sliding_attention``
    layers) and ``sliding_window``; a model without ``layer_types`` applies its ``sliding_window``
    (if any) in every layer. A layer type that is not causal attention over keys (recurrent,
    chunked) raises: masked packing cannot describe it.
    """
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if not types:
        return {FULL: window}
    other = sorted(set(types) - set(ATTENTION_LAYER_TYPES))
    if other:
        raise MioUserError(f"{type(config).__name__} has {other} layers: a packed-attention mask cannot describe them")
    return {t: window if t == "sliding_attention" else None for t in sorted(set(types))}


def segment_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids that are equal exactly within one sample or within a row's padding.

    Padding (-1, only at the end of a row) becomes a segment after every sample, so the ids are
    non-decreasing along each row.
    """
    last = document_ids.shape[-1]  # larger than any document id of the row
    return torch.where(document_ids < 0, torch.full_like(document_ids, last), document_ids).long()


def dense_document_causal_mask(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query q may attend key k: same segment, k <= q (and q - k < window)."""
    seg = segment_ids(document_ids)  # (B, L)
    length = seg.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()  # (L, L)
    if window is not None:
        causal = causal.triu(-(window - 1))  # q - k < window
    same = seg[:, :, None] == seg[:, None, :]  # (B, L, L)
    return (same & causal)[:, None]


def document_causal_block_mask(document_ids: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE,
                               window: int | None = None) -> BlockMask:
    """A FlexAttention BlockMask equal to ``dense_document_causal_mask``, built without any (L, L) tensor.

    Segment ids are non-decreasing along a row, so a key block j can hold a key visible to
    query block i (j <= i) exactly when j's last segment is >= i's first segment; the block is
    full (no mask_mod needed) when j < i and both blocks lie inside one single segment. A window
    further hides key blocks wholly older than it, and a block is full only when all of it is inside.
    """
    seg = segment_ids(document_ids)  # (B, L)
    batch, length = seg.shape
    blocks = -(-length // block_size)
    # Past the end, repeat the last id: the kernel may read mask_mod there, and the extra
    # columns never change which blocks are needed.
    padded = torch.cat([seg, seg[:, -1:].expand(batch, blocks * block_size - length)], dim=1)  # (B, nb*bs)
    per_block = padded.view(batch, blocks, block_size)
    first, last = per_block[..., 0], per_block[..., -1]  # (B, nb): segments are sorted within a block
    q_first, q_last = first[:, :, None], last[:, :, None]  # (B, nb, 1) query blocks
    k_first, k_last = first[:, None, :], last[:, None, :]  # (B, 1, nb) key blocks
    lower = torch.ones(blocks, blocks, dtype=torch.bool, device=seg.device).tril()  # (nb, nb): j <= i
    strictly_lower = lower.tril(-1)
    if window is not None:
        index = torch.arange(blocks, device=seg.device)
        gap = (index[:, None] - index[None, :]) * block_size  # (nb, nb): query block start - key block start
        lower = lower & (gap - (block_size - 1) < window)  # the block's newest key is within the window of its oldest query
        strictly_lower = strictly_lower & (gap + (block_size - 1) < window)  # every pair within the window
    visible = lower & (k_last >= q_first)  # (B, nb, nb)
    full = strictly_lower & (q_first == q_last) & (k_first == k_last) & (k_first == q_first)
    partial = visible & ~full
    limit = length if window is None else window

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (padded[b, q] == padded[b, k]) & (q >= k) & (q - k < limit)

    num_partial, partial_idx = _block_table(partial)
    num_full, full_idx = _block_table(full)
    return BlockMask.from_kv_blocks(
        num_partial, partial_idx, num_full, full_idx,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length),
    )


def _block_table(needed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nb, nb) bool -> counts (B, 1, nb) int32 and key-block indices (B, 1, nb, nb) int32, needed first."""
    counts = needed.sum(-1, dtype=torch.int32)
    # A stable sort of "not needed" puts the needed key blocks first, in increasing order.
    indices = torch.argsort((~needed).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def packed_attention_kwargs(backend: str, batch: dict[str, torch.Tensor | int],
                            windows: dict[str, int | None] | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for ``model(input_ids=batch["input_ids"], **kwargs)`` that isolate samples.

    ``batch`` is what ``mio.data.packing.collate_packs`` returns (tensors on the model's device);
    ``windows`` what :func:`attention_windows` gives for the model (default: full attention only);
    ``dtype`` the eager backend's mask dtype (the model's).
    """
    _check_backend(backend)
    kwargs: dict = {"position_ids": batch["position_ids"]}
    if batch.get("one_sample_per_row"):
        kwargs["attention_mask"] = (batch["document_ids"] >= 0).long()  # (B, L): padding only
        return kwargs
    windows = windows or {FULL: None}
    if backend in ("sdpa", "eager"):
        masks = {t: dense_document_causal_mask(batch["document_ids"], w) for t, w in windows.items()}
        if backend == "eager":
            low = torch.finfo(dtype).min
            masks = {t: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, low)
                     for t, m in masks.items()}
        kwargs["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
    elif backend == "flex":
        if batch["document_ids"].device.type == "cpu" and torch.is_grad_enabled():
            raise MioUserError("attention backend 'flex' has no backward on CPU in torch 2.11: train on CPU with "
                             "'sdpa', or run FlexAttention under torch.no_grad()")
        masks = {t: document_causal_block_mask(batch["document_ids"], window=w) for t, w in windows.items()}
        kwargs["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
    else:
        cu_seqlens = batch["cu_seqlens"].to(device=batch["input_ids"].device, dtype=torch.int32)
        max_seqlen = int(batch["max_seqlen"])
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                      max_length_k=max_seqlen)
    return kwargs
