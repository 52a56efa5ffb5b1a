"""Masked packing: an online best-fit packer and the collate that turns packs into a batch.

Samples are concatenated up to ``context_length`` tokens and each one attends only to itself
(``mio.model.attention`` builds the per-backend masks from ``document_ids`` / ``cu_seqlens``).
In every pack:

- ``position_ids`` restart at 0 for every sample, so a sample sees the positions it would see alone;
- ``labels`` are ``IGNORE_INDEX`` at each sample's first token: under the usual shift (the logit at t predicts
  the label at t+1) that is the place where the last token of one sample would be asked to predict
  the first token of the next;
- padding (only at the end of a pack) has ``document_ids`` -1, ``labels`` ``IGNORE_INDEX``, ``modality`` -1.

A sample longer than the context is cut when it is ``text_only`` (at a token boundary outside every
image/speech block; each piece becomes a sample of its own) and dropped otherwise; both are counted
in ``BestFitPacker.stats``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypedDict

import numpy as np
import torch

from mio.vocab import IGNORE_INDEX

PAD_DOCUMENT = -1
PAD_MODALITY = -1

@dataclass
class TokenSample:
    """One rendered training sample in backbone token ids."""

    input_ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, aligned with input_ids (not shifted), IGNORE_INDEX = unsupervised
    text_only: bool = False  # may be cut at a token boundary outside media blocks
    modality: np.ndarray | None = None  # (n,) int8: 0 text, 1 image, 2 speech; None = unknown (-1)
    key: str = ""  # where the sample came from, for error messages
    dataset: int = -1  # index of the stage's dataset it was read from (-1: none)


@dataclass
class Pack:
    """One row of a batch: several samples side by side, then padding."""

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, IGNORE_INDEX at every sample's first token and on padding
    position_ids: np.ndarray  # (L,) int64, restart at 0 per sample; 0 on padding
    document_ids: np.ndarray  # (L,) int32, 0..k-1 per sample in pack order; -1 on padding
    modality: np.ndarray  # (L,) int8, -1 on padding
    seq_lens: list[int]  # lengths of the k samples, in pack order (padding excluded)
    keys: list[str] = field(default_factory=list)  # the k samples' keys (pieces of a cut sample repeat it)
    datasets: list[int] = field(default_factory=list)  # the k samples' dataset indices


@dataclass
class PackingStats:
    """Running counts of a packer. ``samples_in == samples_packed + samples_dropped_*`` after a full pass."""

    context_length: int
    samples_in: int = 0
    samples_packed: int = 0  # input samples whose tokens all went into packs (a cut sample counts once)
    samples_dropped_too_long: int = 0  # over the context and not cuttable (media, or a media block > context)
    samples_dropped_empty: int = 0
    samples_cut: int = 0  # text-only samples split into pieces
    sequences: int = 0  # sequences placed in packs: uncut samples plus pieces
    tokens: int = 0  # real tokens in packs
    supervised_tokens: int = 0  # labels != IGNORE_INDEX in packs
    packs: int = 0
    pad_tokens: int = 0  # padding added to reach pad_to_multiple_of

    @property
    def efficiency(self) -> float:
        """Real tokens over the packs' capacity (packs x context length)."""
        return self.tokens / max(1, self.packs * self.context_length)


def modality_block_spans(modality: np.ndarray) -> np.ndarray:
    """(k, 2) [start, end) spans of the runs of non-text tokens: the media blocks of a sample."""
    media = np.concatenate([[False], modality != 0, [False]])
    edges = np.flatnonzero(media[1:] != media[:-1])  # run starts and ends, alternating
    return edges.reshape(-1, 2)


def cut_points(n: int, context_length: int, spans: np.ndarray) -> list[int] | None:
    """Ends of the pieces a length-``n`` sequence is cut into, each at most ``context_length`` long.

    Each cut is as late as possible without falling strictly inside a span of ``spans`` ((k, 2),
    [start, end), sorted and disjoint, as :func:`modality_block_spans` gives them). Returns None
    when no such cut exists (a block longer than the context).
    """
    blocks = spans
    ends: list[int] = []
    start = 0
    while n - start > context_length:
        cut = start + context_length
        i = int(np.searchsorted(blocks[:, 0], cut, side="left")) - 1  # last block starting before the cut
        if i >= 0 and blocks[i, 1] > cut:
            cut = int(blocks[i, 0])  # the cut fell inside that block: cut before it instead
        if cut <= start:
            return None
        ends.append(cut)
        start = cut
    ends.append(n)
    return ends


@dataclass
class _OpenPack:
    used: int = 0
    sequences: list[TokenSample] = field(default_factory=list)


class BestFitPacker:
    """Online best-fit packing with at most ``buffer_size`` partially filled packs held open.

    Each sequence goes into the open pack whose free space fits it most tightly (a new pack when
    none fits). A pack is released as soon as it is exactly full; when more than ``buffer_size``
    packs are open, the fullest one is released. At the end of the input, the open packs are
    released from fullest to emptiest. The result depends only on the input order and the
    arguments: ties between open packs go to the one opened first, and packs equally full at the
    final flush are released in an order drawn from ``seed``.

    Args:
        context_length: most real tokens in one pack.
        buffer_size: packs held open at once; more packs fill gaps better and cost memory and latency.
        pad_to_multiple_of: pad each pack's length up to a multiple of this (128 for FlexAttention;
            1 means no padding). The padded length may exceed ``context_length`` by less than one multiple.
        pad_id: input id of padding tokens.
        seed: seeds the order in which the packs of a final flush are released.
        pack: False puts every sequence in a pack of its own, released at once (one sample per row,
            padded): for backbones whose samples an attention mask cannot isolate (recurrent state).
    """

    def __init__(
        self,
        context_length: int = 2800,
        buffer_size: int = 64,
        pad_to_multiple_of: int = 1,
        pad_id: int = 0,
        seed: int = 0,
        pack: bool = True,
    ) -> None:
        if context_length < 1 or buffer_size < 1 or pad_to_multiple_of < 1:
            raise ValueError(
                f"context_length, buffer_size and pad_to_multiple_of must be >= 1, got "
                f"{context_length}, {buffer_size}, {pad_to_multiple_of}"
            )
        self.context_length = context_length
        self.buffer_size = buffer_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        self.seed = seed
        self.pack = pack
        self.stats = PackingStats(context_length=context_length)
        # Positions of a full-length sample; every sequence's position ids are a prefix of it.
        self._positions = np.arange(context_length + pad_to_multiple_of, dtype=np.int64)

    def __call__(self, samples: Iterable[TokenSample]) -> Iterator[Pack]:
        """Pack a stream of samples; yields packs as they are released."""
        return self.place(self.sequences(samples))

    def place(self, sequences: Iterable[TokenSample]) -> Iterator[Pack]:
        """Pack sequences that :meth:`sequences` gave (valid, each within the context); yields packs
        as they are released."""
        frees: list[tuple[int, int]] = []  # sorted (free space, pack number) of the open packs
        open_packs: dict[int, _OpenPack] = {}
        opened = 0
        for seq in sequences:
            n = len(seq.input_ids)
            if not self.pack:
                yield self._emit(_OpenPack(n, [seq]))
                continue
            slot = bisect.bisect_left(frees, (n, -1))  # the tightest gap that fits
            if slot < len(frees):
                free, number = frees.pop(slot)
            else:
                free, number = self.context_length, opened
                open_packs[number] = _OpenPack()
                opened += 1
            pack = open_packs[number]
            pack.sequences.append(seq)
            pack.used += n
            if free == n:
                yield self._emit(open_packs.pop(number))
                continue
            bisect.insort(frees, (free - n, number))
            if len(frees) > self.buffer_size:
                _, fullest = frees.pop(0)
                yield self._emit(open_packs.pop(fullest))
        # Final flush, fullest first; packs equally full go in a seeded random order.
        rng = np.random.default_rng(self.seed)
        tiebreak = rng.permutation(len(frees))
        for _, _, number in sorted((free, int(t), number) for (free, number), t in zip(frees, tiebreak)):
            yield self._emit(open_packs.pop(number))

    def sequences(self, samples: Iterable[TokenSample]) -> Iterator[TokenSample]:
        """The sequences the packer places, in arrival order: each sample whole, cut into pieces
        of at most ``context_length`` tokens, or not at all (dropped). Validates and counts."""
        for sample in samples:
            self.stats.samples_in += 1
            input_ids, labels, modality = _validated(sample, self.stats.samples_in - 1)
            n = len(input_ids)
            if n == 0:
                self.stats.samples_dropped_empty += 1
                continue
            if n <= self.context_length:
                self.stats.samples_packed += 1
                yield replace(sample, input_ids=input_ids, labels=labels, modality=modality)
                continue
            ends = self._cut(sample, modality) if sample.text_only else None
            if ends is None:
                self.stats.samples_dropped_too_long += 1
                continue
            self.stats.samples_packed += 1
            self.stats.samples_cut += 1
            for a, b in zip([0] + ends[:-1], ends):
                yield replace(sample, input_ids=input_ids[a:b], labels=labels[a:b], modality=modality[a:b])

    def _cut(self, sample: TokenSample, modality: np.ndarray) -> list[int] | None:
        """Where a text-only sample is cut: outside its media blocks (the runs of non-text
        ``modality``); a sample without ``modality`` may be cut anywhere."""
        spans = modality_block_spans(modality if sample.modality is not None else np.zeros(0, np.int8))
        return cut_points(len(modality), self.context_length, spans)

    def _emit(self, pack: _OpenPack) -> Pack:
        lens = [len(s.input_ids) for s in pack.sequences]
        used = pack.used
        length = -(-used // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = length - used
        labels = np.concatenate([s.labels for s in pack.sequences] + [np.full(pad, IGNORE_INDEX, np.int64)])
        starts = np.cumsum([0] + lens[:-1])
        labels[starts] = IGNORE_INDEX  # nothing predicts a sample's first token
        out = Pack(
            input_ids=np.concatenate([s.input_ids for s in pack.sequences] + [np.full(pad, self.pad_id, np.int64)]),
            labels=labels,
            position_ids=np.concatenate([self._positions[:n] for n in lens] + [np.zeros(pad, np.int64)]),
            document_ids=np.repeat(np.arange(len(lens) + 1, dtype=np.int32), lens + [pad]),
            modality=np.concatenate([s.modality for s in pack.sequences] + [np.full(pad, PAD_MODALITY, np.int8)]),
            seq_lens=lens,
            keys=[seq.key for seq in pack.sequences],
            datasets=[seq.dataset for seq in pack.sequences],
        )
        out.document_ids[used:] = PAD_DOCUMENT
        self.stats.sequences += len(lens)
        self.stats.tokens += used
        self.stats.supervised_tokens += int(np.count_nonzero(labels != IGNORE_INDEX))
        self.stats.packs += 1
        self.stats.pad_tokens += pad
        return out


def _validated(sample: TokenSample, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids int64, labels int64, modality int8) of a sample, or a ValueError naming it."""
    name = f"sample {index}" + (f" ({sample.key})" if sample.key else "")
    input_ids = np.asarray(sample.input_ids)
    labels = np.asarray(sample.labels)
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise ValueError(
            f"{name}: input_ids and labels must be 1-D of the same length, got shapes "
            f"{input_ids.shape} and {labels.shape}"
        )
    if not (np.issubdtype(input_ids.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{name}: input_ids and labels must be integers, got {input_ids.dtype} and {labels.dtype}")
    if sample.modality is None:
        modality = np.full(input_ids.shape, PAD_MODALITY, np.int8)
    else:
        modality = np.asarray(sample.modality)
        if modality.shape != input_ids.shape:
            raise ValueError(f"{name}: modality has shape {modality.shape}, input_ids {input_ids.shape}")
        modality = modality.astype(np.int8, copy=False)
    return input_ids.astype(np.int64, copy=False), labels.astype(np.int64, copy=False), modality


class PackedBatch(TypedDict):
    """Packs stacked into a batch (:func:`collate_packs`): what the model and the attention
    backends read."""

    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64, IGNORE_INDEX where nothing is scored
    position_ids: torch.Tensor  # (B, L) int64
    document_ids: torch.Tensor  # (B, L) int32, -1 on padding
    modality: torch.Tensor  # (B, L) int8, -1 on padding
    cu_seqlens: torch.Tensor  # (S+1,) int32 offsets of the samples (and each row's padding) in the flat batch
    max_seqlen: int
    one_sample_per_row: bool
    seq_lens: torch.Tensor  # (S,) int64


def collate_packs(packs: Sequence[Pack], pad_id: int = 0) -> PackedBatch:
    """Stack packs into a batch, padding every row to the longest pack.

    Returns ``input_ids``, ``labels``, ``position_ids``, ``document_ids``, ``modality``: (B, L);
    ``cu_seqlens``: (S+1,) int32 offsets of the segments of the flattened (B*L,) batch, where the
    segments are the samples and, after them in each row, the row's padding as one segment (so
    ``cu_seqlens[-1] == B*L``, as flash-attn's varlen kernel needs for the flattened batch);
    ``max_seqlen``: the longest segment, an int; ``one_sample_per_row``: whether no row holds more
    than one sample (then a plain padding mask isolates them), a bool; ``seq_lens``: (S,) int64, the
    samples' lengths row by row (known here, so the training loop never asks the device for them).
    """
    if not packs:
        raise ValueError("collate_packs: no packs to collate")
    length = max(len(p.input_ids) for p in packs)
    rows = len(packs)
    input_ids = np.full((rows, length), pad_id, np.int64)
    labels = np.full((rows, length), IGNORE_INDEX, np.int64)
    position_ids = np.zeros((rows, length), np.int64)
    document_ids = np.full((rows, length), PAD_DOCUMENT, np.int32)
    modality = np.full((rows, length), PAD_MODALITY, np.int8)
    segments: list[int] = []
    lengths: list[int] = []
    for row, pack in enumerate(packs):
        n = len(pack.input_ids)
        input_ids[row, :n] = pack.input_ids
        labels[row, :n] = pack.labels
        position_ids[row, :n] = pack.position_ids
        document_ids[row, :n] = pack.document_ids
        modality[row, :n] = pack.modality
        used = sum(pack.seq_lens)
        segments.extend(pack.seq_lens)
        lengths.extend(pack.seq_lens)
        if used < length:
            segments.append(length - used)
    cu_seqlens = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        document_ids=torch.from_numpy(document_ids),
        modality=torch.from_numpy(modality),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(max(segments)),
        one_sample_per_row=all(len(p.seq_lens) <= 1 for p in packs),
        seq_lens=torch.tensor(lengths, dtype=torch.int64),
    )
