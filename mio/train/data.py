"""The one DataModule of every stage: a weighted mixture of prepared datasets, packed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import AutoTokenizer

from mio.data.pipeline import DatasetSpec, MixtureStream
from mio.data.shards import read_manifest
from mio.vocab import VOCAB_FILE, VocabTable


class MioDataModule(L.LightningDataModule):
    """Batches of ``batch_size`` packs of ``context_length`` tokens per rank and step.

    ``backbone`` and ``extend_vocab`` are linked from the model's settings by the CLI: the
    text tokenizer and the vocabulary table come from the backbone folder.
    """

    def __init__(self, datasets: list[DatasetSpec], root: str = ".", context_length: int = 2800,
                 batch_size: int = 1, buffer_size: int = 64, pad_to_multiple_of: int = 1, num_workers: int = 0,
                 seed: int = 0, backbone: str = "", extend_vocab: bool = False) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("data.datasets is empty: a stage needs at least one prepared dataset")
        if context_length < 8:
            raise ValueError(f"data.context_length must be at least 8, got {context_length}")
        self.datasets, self.root = datasets, root
        self.context_length, self.batch_size, self.buffer_size = context_length, batch_size, buffer_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.backbone, self.extend_vocab = backbone, extend_vocab
        self.stream: MixtureStream | None = None

    def vocab_table(self, tokenizer: Any) -> VocabTable:
        folder = Path(self.backbone)
        if self.extend_vocab:
            return VocabTable.mio_default(len(tokenizer))
        if (folder / VOCAB_FILE).is_file():
            return VocabTable.load(folder)
        return VocabTable.from_tokenizer(tokenizer)

    def manifests(self) -> dict[str, dict[str, Any]]:
        return {d.path: read_manifest(Path(self.root) / d.path) for d in self.datasets}

    def tokenizer_specs(self) -> dict[str, dict[str, Any]]:
        """The modality tokenizer specs the datasets were prepared with (one per kind)."""
        specs: dict[str, dict[str, Any]] = {}
        for name, manifest in self.manifests().items():
            for kind, spec in manifest.get("tokenizers", {}).items():
                if kind in specs and specs[kind]["sha256"] != spec["sha256"]:
                    raise ValueError(f"datasets disagree on the {kind} tokenizer: {specs[kind]['path']} vs "
                                     f"{spec['path']} (dataset {name}); a stage needs one tokenizer per modality")
                specs[kind] = spec
        return specs

    def setup(self, stage: str) -> None:
        if self.stream is not None:
            return
        tokenizer = AutoTokenizer.from_pretrained(self.backbone, local_files_only=True)
        self.stream = MixtureStream(self.datasets, self.root, tokenizer, self.vocab_table(tokenizer),
                                    self.context_length, self.batch_size, self.buffer_size,
                                    self.pad_to_multiple_of, self.seed)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        assert self.stream is not None
        return torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                           persistent_workers=self.num_workers > 0)
