"""Reading prepared datasets into packed training batches.

shards -> safe decode -> templates (directions drawn per sample, seeded by rank and worker)
-> text tokenizer -> token samples -> weighted mixture of datasets -> best-fit packer ->
collated batches. Every stage of the chain is a picklable object, so it runs in DataLoader
workers.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.data.shards import ShardError, StoredSample, decode_sample, list_shards
from mio.segments import Image, Segment, Speech, Text, TextEncoder, Video, render
from mio.templates import (PAIR_TASKS, ConversationError, pair_conversation, pretrain_segments, render_chat)
from mio.vocab import VocabError, VocabTable

PAIR_TYPES = {"image_text": (Image,), "speech_text": (Speech,), "video_text": (Video, Image)}


@dataclass
class DatasetSpec:
    """One prepared dataset in a stage's mixture.

    ``weight`` is its share of samples; ``format`` renders it as pretraining text with
    templates or as ChatML conversations (pair data then becomes conversations of ``tasks``).
    """

    path: str
    weight: float = 1.0
    format: str = "pretrain"
    tasks: list[str] = field(default_factory=list)
    asr_template: str = "asr"

    def __post_init__(self) -> None:
        if self.format not in ("pretrain", "sft"):
            raise ValueError(f"dataset {self.path}: format must be 'pretrain' or 'sft', got {self.format!r}")
        if self.weight <= 0:
            raise ValueError(f"dataset {self.path}: weight must be positive, got {self.weight}")
        unknown = [t for t in self.tasks if t not in PAIR_TASKS]
        if unknown:
            raise ValueError(f"dataset {self.path}: unknown tasks {unknown}; known: {sorted(PAIR_TASKS)}")


class Renderer:
    """A stored sample -> a :class:`TokenSample` for the given dataset spec."""

    def __init__(self, tokenizer: Any, table: VocabTable) -> None:
        self.encode = TextEncoder(tokenizer)
        self.table = table
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id

    def segments(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random) -> tuple[list[Segment], bool]:
        """The segments to train on, and whether the sample is text only (may be cut)."""
        if spec.format == "sft":
            if sample.turns is not None:
                return render_chat(sample.turns, task=sample.task), False
            if not spec.tasks:
                raise ValueError(f"dataset {spec.path}: {sample.data_type} samples under format 'sft' need `tasks`")
            task = spec.tasks[rng.randrange(len(spec.tasks))]
            media = [s for s in sample.segments if not isinstance(s, Text)]
            text = "".join(s.text for s in sample.segments if isinstance(s, Text))
            return render_chat(pair_conversation(task, media[0], text), task=task), False
        if sample.turns is not None:
            raise ValueError(f"{sample.key}: a conversation in a dataset read with format 'pretrain'")
        segs = pretrain_segments(sample.data_type, sample.segments, rng, spec.asr_template)
        return segs, all(isinstance(s, Text) for s in segs)

    def __call__(self, sample: StoredSample, spec: DatasetSpec, rng: random.Random) -> TokenSample:
        segs, text_only = self.segments(sample, spec, rng)
        r = render(segs, self.table, self.encode, bos_id=self.bos, eos_id=self.eos, where=sample.key)
        return TokenSample(input_ids=r.input_ids, labels=r.labels, text_only=text_only,
                           modality=self.table.modality(r.input_ids))


def worker_identity() -> tuple[int, int]:
    """(global worker index, number of workers over all ranks)."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


def stored_samples(shards: Sequence[str], seed: int, worker: int, num_workers: int,
                   errors: Counter) -> Iterator[StoredSample]:
    """This worker's share of a dataset, forever: each pass reshuffles the shard order and
    deals samples round-robin over all workers of all ranks (so one shard serves many)."""
    epoch = 0
    while True:
        order = list(shards)
        random.Random(f"{seed}-{epoch}").shuffle(order)
        index = 0
        yielded = False
        for raw in wds.WebDataset(order, shardshuffle=False, empty_check=False, nodesplitter=None,
                                  workersplitter=None, handler=wds.reraise_exception):
            index += 1
            if (index - 1) % num_workers != worker:
                continue
            try:
                yield decode_sample(raw)
                yielded = True
            except ShardError:
                errors["bad_shard_sample"] += 1
        if not yielded:
            raise ValueError(f"dataset shards {list(shards)[:3]}... gave this worker no readable sample")
        epoch += 1


class MixtureStream(torch.utils.data.IterableDataset):
    """Packed, collated batches drawn from a weighted mixture of prepared datasets."""

    def __init__(self, datasets: Sequence[DatasetSpec], root: str, tokenizer: Any, table: VocabTable,
                 context_length: int, batch_size: int, buffer_size: int = 64, pad_to_multiple_of: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        self.specs = list(datasets)
        self.shards = [list_shards(Path(root) / s.path) for s in self.specs]
        self.renderer = Renderer(tokenizer, table)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length, self.batch_size = context_length, batch_size
        self.buffer_size, self.pad_to_multiple_of, self.seed = buffer_size, pad_to_multiple_of, seed
        self.errors: Counter = Counter()

    def token_samples(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[TokenSample]:
        streams = [stored_samples(s, self.seed, worker, num_workers, self.errors) for s in self.shards]
        weights = [s.weight for s in self.specs]
        while True:
            i = rng.choices(range(len(streams)), weights)[0]
            sample = next(streams[i])
            try:
                yield self.renderer(sample, self.specs[i], rng)
            except (VocabError, ConversationError, ValueError) as e:
                self.errors[f"render:{type(e).__name__}"] += 1
                if self.errors.total() > 1000 and self.errors.total() > 0.5 * (sum(self.errors.values()) + 1000):
                    raise ValueError(f"too many samples fail to render; last: {e}") from e

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = worker_identity()
        rng = random.Random(f"{self.seed}-{worker}")
        packer = BestFitPacker(self.context_length, buffer_size=self.buffer_size, pad_id=self.pad_id,
                               pad_to_multiple_of=self.pad_to_multiple_of, seed=self.seed + worker)
        batch = []
        for pack in packer(self.token_samples(rng, worker, num_workers)):
            batch.append(pack)
            if len(batch) == self.batch_size:
                yield collate_packs(batch, pad_id=self.pad_id)
                batch = []
