"""Reading prepared datasets for training: a WebDataset pipeline per dataset, a token-balanced
mixture of datasets, masked packing, batches.

Per dataset and epoch: the shard list is shuffled with a seed of (seed, epoch), the same on every
reader, and dealt out by *reader slot* (rank x DataLoader worker): whole shards when there are
at least as many shards as slots, else every shard read by every slot keeping every n-th
sample. Either way the slots' samples are disjoint and together cover the dataset once.
Samples are decoded safely (json and integer npy only), shuffled in a buffer and rendered with
the templates; the random draws (pair directions, SFT tasks, shuffling) come from a generator
seeded by (seed, dataset, epoch, rank, worker): reproducible, fresh every epoch, different
across ranks and workers.

The mixture follows the stage's weights in *tokens*: it always draws from the dataset furthest
below its share of the tokens drawn so far. Batch ratios such as stage III's 2:1:1:12 then hold
for the tokens the model sees (75% of them from speech-text data), however long each dataset's
samples are.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds

from mio.data.packing import BestFitPacker, Pack, TokenSample
from mio.data.shards import ShardError, StoredSample, decode_sample, list_shards, shard_sample_counts
from mio.data.tars import ShardFailure, TarSamples
from mio.segments import Rendered, Segment, SegmentRenderer, Text
from mio.templates import (
    GROUNDING_TASKS,
    PAIR_TASKS,
    ConditionDraw,
    ConditionDropout,
    ConversationError,
    grounding_conversations,
    pair_conversation,
    pretrain_segments,
    render_chat,
    template_set,
)
from mio.userio import MioUserError
from mio.vocab import MODALITY_NAMES, TEXT_CODE, VocabError, VocabTable


@dataclass
class DatasetSpec:
    """One prepared dataset in a stage's mixture.

    ``weight``: its share of the mixture (of tokens, or of samples for a mixture built with
    ``balance="samples"``). ``format``: rendered as pretraining text with templates, or as ChatML
    conversations (pair data then becomes conversations of one of ``tasks``). ``cond_dropout`` and
    ``cond_null_text``: the stage's condition dropout (``data.cond_dropout``), set by the DataModule.
    """

    path: str
    weight: float = 1.0
    format: str = "pretrain"
    tasks: list[str] = field(default_factory=list)
    asr_template: str = "asr"
    templates: str = "paper"  # the stage's template set (data.templates), set by the DataModule
    cond_dropout: dict[str, float] = field(default_factory=dict)  # task family -> p (data.cond_dropout)
    cond_null_text: str = ""  # what a dropped condition becomes (data.cond_null_text)

    @property
    def condition_dropout(self) -> ConditionDropout:
        return ConditionDropout(self.cond_dropout, self.cond_null_text)

    def __post_init__(self) -> None:
        if self.format not in ("pretrain", "sft"):
            raise MioUserError(f"dataset {self.path}: format must be 'pretrain' or 'sft', got {self.format!r}")
        if self.weight <= 0:
            raise MioUserError(f"dataset {self.path}: weight must be positive, got {self.weight}")
        unknown = [t for t in self.tasks if t not in PAIR_TASKS and t not in GROUNDING_TASKS]
        if unknown:
            raise MioUserError(f"dataset {self.path}: unknown tasks {unknown}; known: "
                               f"{sorted([*PAIR_TASKS, *GROUNDING_TASKS])}")
        template_set(self.templates)
        ConditionDropout(self.cond_dropout, self.cond_null_text)  # checks the families and probabilities


# --- who reads what -----------------------------------------------------------------------
@dataclass(frozen=True)
class ReaderSlot:
    """One reader: a DataLoader worker of one rank."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.workers


def epoch_order(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: shuffled by (seed, epoch), identical on every reader."""
    order = sorted(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def split_shards(order: Sequence[str], slot: ReaderSlot) -> tuple[list[str], int, int]:
    """(shards this slot reads, sample stride, sample offset): whole shards per slot when there
    are enough, else all shards with every ``count``-th sample."""
    if len(order) >= slot.count:
        return list(order[slot.index::slot.count]), 1, 0
    return list(order), slot.count, slot.index


def reader_rng(seed: int, dataset: int, epoch: int, slot: ReaderSlot) -> random.Random:
    """The generator of one slot's draws over one epoch of one dataset."""
    return random.Random(f"draws:{seed}:{dataset}:{epoch}:{slot.rank}:{slot.worker}")


# --- what reading found and lost ----------------------------------------------------------
ERROR_REASONS = ("shard_unreadable", "shard_truncated", "bad_sample", "render_failed", "over_context")


class DataCounts:
    """What rows of a mixture hold, and what reading them lost, per dataset of the stage (by index).

    ``read``: (D,) samples read from shards; ``errors``: (D, R) samples (or, for the ``shard_*``
    reasons, shards) lost per reason of ``ERROR_REASONS``; ``tokens``: (D,) real tokens packed;
    ``kind_tokens``: (3,) real tokens of text-only samples, of samples with images or video and of
    samples with speech (a sample's kind is the highest modality code it holds: text < image < speech);
    ``examples``: the first example of each (dataset, reason) error, ``"<where>: <what>"``;
    ``cond``: (D, 2) generation samples rendered whose condition the stage's dropout could drop, and
    of those the dropped ones. A plain class, so Lightning passes it through a batch untouched.
    """

    def __init__(self, datasets: int) -> None:
        self.read = np.zeros(datasets, np.int64)
        self.errors = np.zeros((datasets, len(ERROR_REASONS)), np.int64)
        self.tokens = np.zeros(datasets, np.int64)
        self.kind_tokens = np.zeros(len(MODALITY_NAMES), np.int64)
        self.cond = np.zeros((datasets, 2), np.int64)
        self.examples: dict[tuple[int, int], str] = {}

    def error(self, dataset: int, reason: str, example: str) -> None:
        r = ERROR_REASONS.index(reason)
        self.errors[dataset, r] += 1
        self.examples.setdefault((dataset, r), example)

    def add(self, other: "DataCounts") -> "DataCounts":
        self.read += other.read
        self.errors += other.errors
        self.tokens += other.tokens
        self.kind_tokens += other.kind_tokens
        self.cond += other.cond
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        return self

    def take(self) -> "DataCounts":
        """What accumulated since the last ``take``; this object starts again from zero."""
        out = DataCounts(len(self.read)).add(self)
        self.read[:], self.errors[:], self.tokens[:], self.kind_tokens[:], self.cond[:] = 0, 0, 0, 0, 0
        self.examples = {}
        return out

    def vector(self) -> np.ndarray:
        """The counts as one (K,) float64 vector (to sum over ranks), examples left out."""
        return np.concatenate([self.read, self.errors.ravel(), self.tokens, self.kind_tokens,
                               self.cond.ravel()]).astype(np.float64)

    def from_vector(self, vector: Sequence[float]) -> "DataCounts":
        """Counts read back from a (summed) ``vector``, with this object's examples."""
        d, r = len(self.read), len(ERROR_REASONS)
        v = np.rint(np.asarray(vector, dtype=np.float64)).astype(np.int64)
        out = DataCounts(d)
        out.read, out.errors = v[:d], v[d:d + d * r].reshape(d, r)
        k = 2 * d + d * r + len(MODALITY_NAMES)
        out.tokens, out.kind_tokens = v[d + d * r:2 * d + d * r], v[2 * d + d * r:k]
        out.cond = v[k:].reshape(d, 2)
        out.examples = dict(self.examples)
        return out


class _ShardFailures:
    """``on_failure`` of the tar stage: a failed shard counted against its dataset."""

    def __init__(self, counts: DataCounts, dataset: int) -> None:
        self.counts, self.dataset = counts, dataset

    def __call__(self, failure: ShardFailure) -> None:
        self.counts.error(self.dataset, f"shard_{failure.reason}", failure.message())


class _Ignore:
    """``on_failure`` of a slot that reads a shard another slot counts (see ``split_shards``)."""

    def __call__(self, failure: ShardFailure) -> None:
        return None


class _SafeDecode:
    """Raw samples -> :class:`StoredSample` (json and integer npy only); each one read is counted,
    and one that does not decode is counted as ``bad_sample`` with its error."""

    def __init__(self, counts: DataCounts, dataset: int) -> None:
        self.counts, self.dataset = counts, dataset

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[StoredSample]:
        for raw in samples:
            self.counts.read[self.dataset] += 1
            try:
                yield decode_sample(raw)
            except ShardError as e:
                self.counts.error(self.dataset, "bad_sample", str(e))


def epoch_samples(shards: Sequence[str], slot: ReaderSlot, seed: int, epoch: int, counts: DataCounts,
                  dataset: int = 0, shuffle_buffer: int = 0, order_rng: random.Random | None = None,
                  expected: dict[str, int] | None = None) -> wds.DataPipeline:
    """One epoch of one dataset as this slot sees it: a WebDataset pipeline of this slot's
    shards -> samples (the tar stage; ``expected`` sample counts per shard from the manifests)
    -> sample stride -> safe decode -> a shuffle buffer of ``shuffle_buffer`` samples drawn with
    ``order_rng`` (0: shard order). What it reads and loses goes to ``counts`` under ``dataset``."""
    mine, stride, offset = split_shards(epoch_order(shards, seed, epoch), slot)
    # With a sample stride every slot reads every shard: one of them counts a failed shard.
    failures = _ShardFailures(counts, dataset) if offset == 0 else _Ignore()
    return wds.DataPipeline(
        wds.SimpleShardList(mine),
        TarSamples(failures, expected),
        wds.slice(offset, None, stride),  # a dataset with fewer shards than slots deals out its samples
        _SafeDecode(counts, dataset),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=order_rng or random.Random(0)),
    )


# --- rendering ------------------------------------------------------------------------------
def training_segments(sample: StoredSample, spec: DatasetSpec, rng: random.Random,
                      draw: ConditionDraw | None = None) -> tuple[list[Segment], bool]:
    """The segments to train on, and whether the sample is text only (may be cut); ``draw``: the
    sample's condition dropout (generation templates and pair tasks only)."""
    if spec.format == "sft":
        if sample.turns is not None:
            return render_chat(sample.turns, task=sample.task), False
        if not spec.tasks:
            raise MioUserError(f"dataset {spec.path}: {sample.data_type} samples under format 'sft' need `tasks`")
        if sample.data_type == "grounding":  # a task the sample's form serves, then one of its conversations
            served = [(t, c) for t in spec.tasks if t in GROUNDING_TASKS
                      for c in [grounding_conversations(t, sample.segments, template_set(spec.templates))] if c]
            if not served:
                raise MioUserError(f"{sample.key}: this grounding sample serves none of the tasks {spec.tasks}")
            task, conversations = served[rng.randrange(len(served))]
            return render_chat(conversations[rng.randrange(len(conversations))], task=task), False
        task = spec.tasks[rng.randrange(len(spec.tasks))]
        media = [s for s in sample.segments if not isinstance(s, Text)]
        text = "".join(s.text for s in sample.segments if isinstance(s, Text))
        if len(media) != 1:
            raise MioUserError(f"{sample.key}: a pair task needs one media segment, got {len(media)}")
        return render_chat(pair_conversation(task, media[0], text, template_set(spec.templates), draw), task=task), False
    if sample.turns is not None:
        raise MioUserError(f"{sample.key}: a conversation in a dataset read with format 'pretrain'")
    segs = pretrain_segments(sample.data_type, sample.segments, rng, spec.asr_template, template_set(spec.templates),
                             draw)
    return segs, all(isinstance(s, Text) for s in segs)


RENDER_ERRORS = (VocabError, ConversationError, ValueError)


class TrainingRenderer:
    """A stored sample -> a :class:`TokenSample` for the given dataset spec.

    The ids are the backbone tokenizer's for the sample's text form (see
    :class:`mio.segments.SegmentRenderer`); a pretraining sample ends with the tokenizer's EOS
    token (supervised like its last segment), an SFT conversation with its last ``<|im_end|>``.
    """

    def __init__(self, tokenizer: Any, table: VocabTable) -> None:
        self.renderer = SegmentRenderer(tokenizer, table)
        self.table = table
        self.eos = tokenizer.eos_token

    def segments(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random,
                 draw: ConditionDraw | None = None) -> tuple[list[Segment], bool]:
        segs, text_only = training_segments(sample, spec, rng, draw)
        if spec.format == "pretrain" and self.eos is not None and segs:
            segs = [*segs, Text(self.eos, loss=segs[-1].loss)]
        return segs, text_only

    def __call__(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random, epoch: int = 0,
                 seed: int = 0) -> TokenSample:
        return self.render(sample, *self.segments(sample, spec, rng, _condition_draw(sample, spec, epoch, seed)))

    def render(self, sample: StoredSample, segs: list[Segment], text_only: bool) -> TokenSample:
        return self._sample(sample, self.renderer(segs, where=sample.key), text_only)

    def _sample(self, sample: StoredSample, r: Rendered, text_only: bool) -> TokenSample:
        return TokenSample(input_ids=r.input_ids, labels=r.labels, text_only=text_only,
                           modality=self.table.modality(r.input_ids), key=sample.key)

    def many(self, samples: Sequence[StoredSample], spec: DatasetSpec, rng: random.Random,
             on_error: Callable[[StoredSample, Exception], None], epoch: int = 0, seed: int = 0,
             cond: np.ndarray | None = None) -> list[TokenSample]:
        """Render a block of samples with one tokenizer call; draws are made in sample order,
        so the result equals rendering them one by one. A sample that fails goes to ``on_error``
        and is left out. The spec's condition dropout draws from (sample key, ``epoch``, ``seed``);
        ``cond`` (2,) counts the rendered samples it could drop, and the dropped ones."""
        drafts = []
        for sample in samples:
            draw = _condition_draw(sample, spec, epoch, seed)
            try:
                segs, text_only = self.segments(sample, spec, rng, draw)
                drafts.append((sample, self.renderer.draft(segs, where=sample.key), text_only))
            except RENDER_ERRORS as e:
                on_error(sample, e)
                continue
            if cond is not None and draw is not None and draw.outcome is not None:
                cond += (1, int(draw.outcome))
        rendered = self.renderer.finish([d for _, d, _ in drafts])
        return [self._sample(sample, r, text_only) for (sample, _, text_only), r in zip(drafts, rendered)]


def _condition_draw(sample: StoredSample, spec: DatasetSpec, epoch: int, seed: int) -> ConditionDraw | None:
    """The sample's condition dropout draw, None where the spec drops nothing."""
    dropout = spec.condition_dropout
    return ConditionDraw(dropout, sample.key, epoch, seed) if dropout.active else None


class _RenderFailures:
    """``on_error`` of ``TrainingRenderer.many``: a sample that fails to render, counted against its dataset."""

    def __init__(self, counts: DataCounts, dataset: int) -> None:
        self.counts, self.dataset = counts, dataset

    def __call__(self, sample: StoredSample, error: Exception) -> None:
        self.counts.error(self.dataset, "render_failed", f"{sample.key}: {type(error).__name__}: {error}")


def error_summary(counts: DataCounts, dataset: int) -> str:
    """``reason count, ...; e.g. <example>`` of one dataset's errors (``no errors`` when none)."""
    found = [(ERROR_REASONS[r], int(n)) for r, n in enumerate(counts.errors[dataset]) if n]
    if not found:
        return "no errors"
    example = next(counts.examples[k] for k in sorted(counts.examples) if k[0] == dataset)
    return ", ".join(f"{reason} {n}" for reason, n in found) + f"; e.g. {example}"


def dataset_stream(shards: Sequence[str], spec: DatasetSpec, renderer: TrainingRenderer, slot: ReaderSlot, seed: int,
                   dataset: int, counts: DataCounts, shuffle_buffer: int = 256, render_block: int = 32,
                   expected: dict[str, int] | None = None) -> Iterator[TokenSample]:
    """One dataset's rendered samples for this slot, epoch after epoch, forever (rendered in
    blocks of ``render_block`` samples, one text tokenizer call per block), each naming its
    ``dataset``; what it reads and loses goes to ``counts``."""
    failures = _RenderFailures(counts, dataset)
    for epoch in itertools.count():
        rng = reader_rng(seed, dataset, epoch, slot)
        order_rng = random.Random(f"shuffle:{seed}:{dataset}:{epoch}:{slot.rank}:{slot.worker}")
        rendered = 0
        samples = iter(epoch_samples(shards, slot, seed, epoch, counts, dataset, shuffle_buffer, order_rng, expected))
        while block := list(itertools.islice(samples, render_block)):
            done = renderer.many(block, spec, rng, failures, epoch, seed, counts.cond[dataset])
            rendered += len(done)
            for sample in done:
                sample.dataset = dataset
            yield from done
        if rendered == 0:
            raise MioUserError(f"dataset {spec.path}: epoch {epoch} gave reader {slot} no sample "
                             f"({len(shards)} shards; {error_summary(counts, dataset)})")


# --- mixture --------------------------------------------------------------------------------
def balanced_mixture(streams: Sequence[Iterator[TokenSample]], weights: Sequence[float], balance: str = "tokens",
                     released: np.ndarray | None = None) -> Iterator[TokenSample]:
    """Draws from the stream furthest below its share: of the tokens drawn so far
    (``balance="tokens"``) or of the samples (``"samples"``). Deterministic given the streams.

    ``released``, when given, holds what a downstream packer has emitted per dataset so far (same
    unit); the draw then also makes up for the packer's buffer holding back one dataset more
    than another, so the shares hold in the packed batches, not only in what went in.
    """
    if balance not in ("tokens", "samples"):
        raise MioUserError(f"balance must be 'tokens' or 'samples', got {balance!r}")
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    drawn = np.zeros(len(streams), dtype=np.float64)
    while True:
        deficit = share * (drawn.sum() + 1.0) - drawn
        if released is not None:
            deficit += share * released.sum() - released
        i = int(np.argmax(deficit))
        sample = next(streams[i])
        drawn[i] += len(sample.input_ids) if balance == "tokens" else 1
        yield sample


def kind_tokens(pack: Pack) -> np.ndarray:
    """(3,) real tokens of the pack's text-only samples, samples with images and samples with speech."""
    lens = np.asarray(pack.seq_lens)
    starts = np.concatenate([[0], np.cumsum(lens[:-1])])
    # A sample's kind is its highest modality code: text < image < speech.
    kinds = np.maximum.reduceat(pack.modality[:int(lens.sum())], starts).clip(min=TEXT_CODE)
    return np.bincount(kinds, weights=lens, minlength=len(MODALITY_NAMES)).astype(np.int64)


@dataclass
class PackedRow:
    """One packed row of a row stream, and what the stream read and lost since its previous row."""

    pack: Pack
    counts: DataCounts


class Mixture:
    """A stage's token-balanced mixture of prepared datasets, read as packed rows.

    :meth:`rows` is the one path from shards to packs: the training reader
    (:mod:`mio.data.pipeline`), its tests and ``mio bench data`` all read it. ``shards``: each
    dataset's shard list, where not the shards of its folder (or glob) under ``root``; ``pack``:
    False puts one sample in each row (the packer's setting).
    """

    def __init__(self, datasets: Sequence[DatasetSpec], root: str | os.PathLike, tokenizer: Any, table: VocabTable,
                 context_length: int, buffer_size: int = 64, pad_to_multiple_of: int = 1, seed: int = 0,
                 balance: str = "tokens", shuffle_buffer: int = 256,
                 shards: Sequence[Sequence[str]] | None = None, pack: bool = True) -> None:
        if balance not in ("tokens", "samples"):
            raise MioUserError(f"balance must be 'tokens' or 'samples', got {balance!r}")
        self.specs = list(datasets)
        self.shards = [list(s) for s in shards] if shards is not None else [list_shards(Path(root) / s.path)
                                                                              for s in self.specs]
        if len(self.shards) != len(self.specs) or not all(self.shards):
            raise ValueError(f"Mixture: {len(self.specs)} datasets need a non-empty shard list each")
        self.expected = [shard_sample_counts(shards) for shards in self.shards]
        self.renderer = TrainingRenderer(tokenizer, table)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length, self.buffer_size = context_length, buffer_size
        self.pad_to_multiple_of, self.seed = pad_to_multiple_of, seed
        self.balance, self.shuffle_buffer = balance, shuffle_buffer
        self.pack = pack  # False: one sample per row (the packer's setting)

    def rows(self, slot: ReaderSlot) -> Iterator[PackedRow]:
        """Reader slot ``slot``'s packs, each with its counts. The mixture draws the sequences the
        packer places as they are (text over the context already cut, media over it left out and
        counted), seeing what the packer has released per dataset; every sample carries its
        dataset from the reader to the pack."""
        counts = DataCounts(len(self.specs))
        released = np.zeros(len(self.specs), dtype=np.float64)
        streams = [self._sequences(dataset_stream(shards, spec, self.renderer, slot, self.seed, i, counts,
                                                  self.shuffle_buffer, expected=expected), i, counts)
                   for i, (shards, spec, expected) in enumerate(zip(self.shards, self.specs, self.expected))]
        packer = BestFitPacker(self.context_length, buffer_size=self.buffer_size, pad_id=self.pad_id,
                               pad_to_multiple_of=self.pad_to_multiple_of, seed=self.seed + slot.index, pack=self.pack)
        # The streams are the packer's own `sequences` already (per dataset): placed as they are.
        for pack in packer.place(balanced_mixture(streams, [s.weight for s in self.specs], self.balance, released)):
            lens = np.asarray(pack.seq_lens, dtype=np.int64)
            np.add.at(released, pack.datasets, lens if self.balance == "tokens" else 1)
            np.add.at(counts.tokens, pack.datasets, lens)
            counts.kind_tokens += kind_tokens(pack)
            yield PackedRow(pack, counts.take())

    def _sequences(self, stream: Iterator[TokenSample], dataset: int, counts: DataCounts,
                   max_dropped_in_a_row: int = 1000) -> Iterator[TokenSample]:
        cutter = BestFitPacker(self.context_length)  # its `sequences` only: cut or drop, as packing would
        name = self.specs[dataset].path
        since_packed = 0

        def fed() -> Iterator[TokenSample]:
            nonlocal since_packed
            previous, dropped = None, 0
            for sample in stream:
                if cutter.stats.samples_dropped_too_long > dropped:  # asked for more: it dropped `previous`
                    dropped += 1
                    counts.error(dataset, "over_context", f"{previous.key}: {len(previous.input_ids)} tokens, over "
                                                          f"data.context_length={self.context_length}")
                since_packed += 1
                if since_packed > max_dropped_in_a_row:  # else a dataset all over the context is read forever
                    raise MioUserError(f"dataset {name}: {max_dropped_in_a_row} samples in a row are longer than "
                                     f"data.context_length={self.context_length} and cannot be packed; raise the "
                                     f"context length or drop the dataset from the stage")
                previous = sample
                yield sample

        for seq in cutter.sequences(fed()):
            since_packed = 0
            yield seq
