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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from mio.data.packing import BestFitPacker, Pack, TokenSample, collate_packs
from mio.data.shards import ShardError, StoredSample, decode_sample, list_shards
from mio.data.tars import ShardFailure, TarSamples
from mio.segments import Rendered, Segment, SegmentRenderer, Text
from mio.templates import (PAIR_TASKS, ConversationError, pair_conversation, pretrain_segments, render_chat,
                           template_set)
from mio.vocab import MODALITY_NAMES, VocabError, VocabTable


@dataclass
class DatasetSpec:
    """One prepared dataset in a stage's mixture.

    ``weight``: its share of the mixture (of tokens, or of samples for a mixture built with
    ``balance="samples"``). ``format``: rendered as pretraining text with templates, or as ChatML
    conversations (pair data then becomes conversations of one of ``tasks``).
    """

    path: str
    weight: float = 1.0
    format: str = "pretrain"
    tasks: list[str] = field(default_factory=list)
    asr_template: str = "asr"
    templates: str = "paper"  # the stage's template set (data.templates), set by the DataModule

    def __post_init__(self) -> None:
        if self.format not in ("pretrain", "sft"):
            raise ValueError(f"dataset {self.path}: format must be 'pretrain' or 'sft', got {self.format!r}")
        if self.weight <= 0:
            raise ValueError(f"dataset {self.path}: weight must be positive, got {self.weight}")
        unknown = [t for t in self.tasks if t not in PAIR_TASKS]
        if unknown:
            raise ValueError(f"dataset {self.path}: unknown tasks {unknown}; known: {sorted(PAIR_TASKS)}")
        template_set(self.templates)


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

    @classmethod
    def current(cls) -> "ReaderSlot":
        """This process's slot: rank from torch.distributed (else RANK/WORLD_SIZE), worker from
        the DataLoader's worker info."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return cls(rank, world, worker, workers)


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


class CountShardFailures:
    """``on_failure`` of the tar stage: a failed shard is counted (its samples before the failure are kept)."""

    def __init__(self, errors: Counter) -> None:
        self.errors = errors

    def __call__(self, failure: ShardFailure) -> None:
        self.errors["bad_shard"] += 1


def _take(stride: int, offset: int) -> Any:
    def stage(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return itertools.islice(samples, offset, None, stride)

    return stage


def _safe_decode(errors: Counter) -> Any:
    def stage(samples: Iterable[dict[str, Any]]) -> Iterator[StoredSample]:
        for raw in samples:
            try:
                yield decode_sample(raw)
            except ShardError:
                errors["bad_shard_sample"] += 1

    return stage


def epoch_samples(shards: Sequence[str], slot: ReaderSlot, seed: int, epoch: int, errors: Counter,
                  shuffle_buffer: int = 0, order_rng: random.Random | None = None) -> wds.DataPipeline:
    """One epoch of one dataset as this slot sees it: a WebDataset pipeline of this slot's
    shards (node and worker split) -> samples -> sample stride -> safe decode -> a shuffle
    buffer of ``shuffle_buffer`` samples drawn with ``order_rng`` (0: in shard order)."""
    mine, stride, offset = split_shards(epoch_order(shards, seed, epoch), slot)
    return wds.DataPipeline(
        wds.SimpleShardList(mine),
        TarSamples(CountShardFailures(errors)),
        _take(stride, offset),
        _safe_decode(errors),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=order_rng or random.Random(0)),
    )


# --- rendering ------------------------------------------------------------------------------
def training_segments(sample: StoredSample, spec: DatasetSpec, rng: random.Random) -> tuple[list[Segment], bool]:
    """The segments to train on, and whether the sample is text only (may be cut)."""
    if spec.format == "sft":
        if sample.turns is not None:
            return render_chat(sample.turns, task=sample.task), False
        if not spec.tasks:
            raise ValueError(f"dataset {spec.path}: {sample.data_type} samples under format 'sft' need `tasks`")
        task = spec.tasks[rng.randrange(len(spec.tasks))]
        media = [s for s in sample.segments if not isinstance(s, Text)]
        text = "".join(s.text for s in sample.segments if isinstance(s, Text))
        if len(media) != 1:
            raise ValueError(f"{sample.key}: a pair task needs one media segment, got {len(media)}")
        return render_chat(pair_conversation(task, media[0], text, template_set(spec.templates)), task=task), False
    if sample.turns is not None:
        raise ValueError(f"{sample.key}: a conversation in a dataset read with format 'pretrain'")
    segs = pretrain_segments(sample.data_type, sample.segments, rng, spec.asr_template, template_set(spec.templates))
    return segs, all(isinstance(s, Text) for s in segs)


RENDER_ERRORS = (VocabError, ConversationError, ValueError)


class Renderer:
    """A stored sample -> a :class:`TokenSample` for the given dataset spec.

    The ids are the backbone tokenizer's for the sample's text form (see
    :class:`mio.segments.SegmentRenderer`); a pretraining sample ends with the tokenizer's EOS
    token (supervised like its last segment), an SFT conversation with its last ``<|im_end|>``.
    """

    def __init__(self, tokenizer: Any, table: VocabTable) -> None:
        self.renderer = SegmentRenderer(tokenizer, table)
        self.table = table
        self.eos = tokenizer.eos_token

    def segments(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random) -> tuple[list[Segment], bool]:
        segs, text_only = training_segments(sample, spec, rng)
        if spec.format == "pretrain" and self.eos is not None and segs:
            segs = [*segs, Text(self.eos, loss=segs[-1].loss)]
        return segs, text_only

    def __call__(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random) -> TokenSample:
        return self.render(sample, *self.segments(sample, spec, rng))

    def render(self, sample: StoredSample, segs: list[Segment], text_only: bool) -> TokenSample:
        return self._sample(sample, self.renderer(segs, where=sample.key), text_only)

    def _sample(self, sample: StoredSample, r: Rendered, text_only: bool) -> TokenSample:
        return TokenSample(input_ids=r.input_ids, labels=r.labels, text_only=text_only,
                           modality=self.table.modality(r.input_ids), key=sample.key)

    def many(self, samples: Sequence[StoredSample], spec: DatasetSpec, rng: random.Random,
             errors: Counter) -> list[TokenSample]:
        """Render a block of samples with one tokenizer call; draws are made in sample order,
        so the result equals rendering them one by one. Failures are counted and left out."""
        drafts = []
        for sample in samples:
            try:
                segs, text_only = self.segments(sample, spec, rng)
                drafts.append((sample, self.renderer.draft(segs, where=sample.key), text_only))
            except RENDER_ERRORS as e:
                errors[f"render:{type(e).__name__}"] += 1
        rendered = self.renderer.finish([d for _, d, _ in drafts])
        return [self._sample(sample, r, text_only) for (sample, _, text_only), r in zip(drafts, rendered)]


def dataset_stream(shards: Sequence[str], spec: DatasetSpec, renderer: Renderer, slot: ReaderSlot, seed: int,
                   dataset: int, errors: Counter, shuffle_buffer: int = 256,
                   render_block: int = 32) -> Iterator[TokenSample]:
    """One dataset's rendered samples for this slot, epoch after epoch, forever (rendered in
    blocks of ``render_block`` samples, one text tokenizer call per block)."""
    for epoch in itertools.count():
        rng = reader_rng(seed, dataset, epoch, slot)
        order_rng = random.Random(f"shuffle:{seed}:{dataset}:{epoch}:{slot.rank}:{slot.worker}")
        rendered = 0
        samples = iter(epoch_samples(shards, slot, seed, epoch, errors, shuffle_buffer, order_rng))
        while block := list(itertools.islice(samples, render_block)):
            done = renderer.many(block, spec, rng, errors)
            failed = len(block) - len(done)
            if failed and errors.total() > 1000 and errors.total() > 10 * (rendered + 1):
                raise ValueError(f"dataset {spec.path}: most samples fail to render; errors {dict(errors)}")
            rendered += len(done)
            yield from done
        if rendered == 0:
            raise ValueError(f"dataset {spec.path}: epoch {epoch} gave reader {slot} no sample "
                             f"({len(shards)} shards; errors {dict(errors)})")


# --- mixture --------------------------------------------------------------------------------
@dataclass
class Drawn:
    """A mixture's draw: the sample and the index of the dataset it came from."""

    sample: TokenSample
    dataset: int


def balanced_mixture(streams: Sequence[Iterator[TokenSample]], weights: Sequence[float], balance: str = "tokens",
                     released: np.ndarray | None = None) -> Iterator[Drawn]:
    """Draws from the stream furthest below its share: of the tokens drawn so far
    (``balance="tokens"``) or of the samples (``"samples"``). Deterministic given the streams.

    ``released``, when given, holds what a downstream packer has emitted per dataset so far (same
    unit); the draw then also makes up for the packer's buffer holding back one dataset more
    than another, so the shares hold in the packed batches, not only in what went in.
    """
    if balance not in ("tokens", "samples"):
        raise ValueError(f"balance must be 'tokens' or 'samples', got {balance!r}")
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    drawn = np.zeros(len(streams), dtype=np.float64)
    while True:
        deficit = share * (drawn.sum() + 1.0) - drawn
        if released is not None:
            deficit += share * released.sum() - released
        i = int(np.argmax(deficit))
        sample = next(streams[i])
        drawn[i] += len(sample.input_ids) if balance == "tokens" else 1
        yield Drawn(sample, i)


class MixtureBatches(torch.utils.data.IterableDataset):
    """Packed, collated batches drawn from a token-balanced mixture of prepared datasets."""

    def __init__(self, datasets: Sequence[DatasetSpec], root: str | os.PathLike, tokenizer: Any, table: VocabTable,
                 context_length: int, batch_size: int, buffer_size: int = 64, pad_to_multiple_of: int = 1,
                 seed: int = 0, balance: str = "tokens", shuffle_buffer: int = 256,
                 shards: Sequence[Sequence[str]] | None = None, pack: bool = True) -> None:
        """``shards``: each dataset's shards, when not all of its folder's (validation holds some out);
        ``pack``: False puts one sample in each row (the packer's setting)."""
        super().__init__()
        self.specs = list(datasets)
        self.shards = ([list(x) for x in shards] if shards is not None
                       else [list_shards(Path(root) / s.path) for s in self.specs])
        self.renderer = Renderer(tokenizer, table)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length, self.batch_size = context_length, batch_size
        self.buffer_size, self.pad_to_multiple_of, self.seed = buffer_size, pad_to_multiple_of, seed
        self.balance, self.shuffle_buffer = balance, shuffle_buffer
        self.pack = pack  # False: one sample per row (the packer's setting)
        self.errors: Counter = Counter()
        self.packer: BestFitPacker | None = None  # the packer of the latest iteration (its stats)

    def draws(self, slot: ReaderSlot, released: np.ndarray | None = None) -> Iterator[Drawn]:
        """The mixture's draws: sequences the packer places as they are (text over the context
        already cut, media over it left out and counted), so what is drawn is what is packed."""
        streams = [self._sequences(dataset_stream(shards, spec, self.renderer, slot, self.seed, i, self.errors,
                                                  self.shuffle_buffer), spec.path)
                   for i, (shards, spec) in enumerate(zip(self.shards, self.specs))]
        return balanced_mixture(streams, [s.weight for s in self.specs], self.balance, released)

    def _sequences(self, stream: Iterator[TokenSample], name: str,
                   max_dropped_in_a_row: int = 1000) -> Iterator[TokenSample]:
        cutter = BestFitPacker(self.context_length)  # its `sequences` only: cut or drop, as packing would
        dropped = 0
        since_last = 0

        def counted() -> Iterator[TokenSample]:
            # A dataset whose samples are all over the context would otherwise be read forever.
            nonlocal since_last
            for sample in stream:
                since_last += 1
                if since_last > max_dropped_in_a_row:
                    raise ValueError(f"dataset {name}: {max_dropped_in_a_row} samples in a row are longer than "
                                     f"data.context_length={self.context_length} and cannot be packed; raise the "
                                     f"context length or drop the dataset from the stage")
                yield sample

        for seq in cutter.sequences(counted()):
            since_last = 0
            self.errors["over_context"] += cutter.stats.samples_dropped_too_long - dropped
            dropped = cutter.stats.samples_dropped_too_long
            yield seq

    def packs(self, slot: ReaderSlot) -> Iterator[tuple[Pack, list[int]]]:
        """Packs, each with the dataset of each of its sequences; the mixture sees what was
        released, per dataset, as it draws."""
        packer = BestFitPacker(self.context_length, buffer_size=self.buffer_size, pad_id=self.pad_id,
                               pad_to_multiple_of=self.pad_to_multiple_of, seed=self.seed + slot.index, pack=self.pack)
        self.packer = packer
        released = np.zeros(len(self.specs), dtype=np.float64)
        origin: dict[bytes, list[int]] = {}  # ids of drawn sequences -> their datasets, in order

        def tagged() -> Iterator[TokenSample]:
            for d in self.draws(slot, released):
                origin.setdefault(d.sample.input_ids.tobytes(), []).append(d.dataset)
                yield d.sample

        for pack in packer(tagged()):
            datasets, start = [], 0
            for n in pack.seq_lens:
                key = pack.input_ids[start:start + n].tobytes()
                datasets.append(origin[key].pop(0))
                if not origin[key]:
                    del origin[key]
                released[datasets[-1]] += n if self.balance == "tokens" else 1
                start += n
            yield pack, datasets

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        batch: list[Pack] = []
        for pack, _ in self.packs(ReaderSlot.current()):
            batch.append(pack)
            if len(batch) == self.batch_size:
                yield collate_packs(batch, pad_id=self.pad_id)
                batch = []


# --- measuring a mixture --------------------------------------------------------------------
def measure_shares(mixture: MixtureBatches, batches: int, slot: ReaderSlot = ReaderSlot(),
                   skip_batches: int = 0) -> dict[str, Any]:
    """Token shares per dataset and per modality in a window of ``batches`` packed batches
    (after ``skip_batches``), each packed sequence attributed to the dataset it was drawn from."""
    per_dataset = np.zeros(len(mixture.specs), dtype=np.int64)
    per_modality: Counter = Counter()
    packs = mixture.packs(slot)
    for _ in range(skip_batches * mixture.batch_size):
        next(packs)
    for pack, datasets in itertools.islice(packs, batches * mixture.batch_size):
        np.add.at(per_dataset, datasets, pack.seq_lens)
        real = pack.modality[pack.modality >= 0]
        per_modality.update({int(m): int(c) for m, c in zip(*np.unique(real, return_counts=True))})
    total = int(per_dataset.sum())
    return {
        "tokens": total,
        "dataset_share": {s.path: float(per_dataset[i]) / max(total, 1) for i, s in enumerate(mixture.specs)},
        "modality_share": {MODALITY_NAMES[m]: c / max(total, 1) for m, c in sorted(per_modality.items())},
        "packing_efficiency": mixture.packer.stats.efficiency if mixture.packer else 0.0,
        "dropped_over_context": mixture.errors["over_context"],
    }
