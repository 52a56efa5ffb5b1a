"""The training module and the data module meet in one call (MioModule.connect ->
MioDataModule.connect, made by `mio fit`): neither finds the other through the trainer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from train_support import shared_root

from mio.data.reading import DatasetSpec
from mio.train.data import DataLink, MioDataModule
from mio.train.module import Figures, MioModule
from mio.vocab import MODALITY_NAMES

MIO = Path(__file__).resolve().parents[1] / "mio"
THROUGH_TRAINER = re.compile(r"trainer\s*\.\s*(lightning_module|datamodule)\b|[\"'](lightning_module|datamodule)[\"']")


def test_no_module_reads_another_through_the_trainer():
    found = [f"{path.relative_to(MIO.parent)}:{n}: {line.strip()}" for path in sorted(MIO.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if THROUGH_TRAINER.search(line)]
    assert found == []


def test_the_grep_sees_the_forms_it_forbids():
    for line in ("x = self.trainer.lightning_module.table", "getattr(self.trainer, 'datamodule', None)",
                 "trainer.datamodule.pack"):
        assert THROUGH_TRAINER.search(line), line
    assert not THROUGH_TRAINER.search("self.data = datamodule.connect(tokenizer=t)")


def test_figures_add_up_by_name():
    """Two micro-batches' figures: sums add, the largest |logit| is a maximum; read back by name
    from the two reduction vectors."""
    import dataclasses

    import torch

    g = torch.Generator().manual_seed(0)
    parts = []
    for _ in range(2):
        f = Figures.zeros(torch.device("cpu"))
        for field in dataclasses.fields(f):
            setattr(f, field.name, torch.rand(getattr(f, field.name).shape, generator=g, dtype=torch.float64))
        parts.append(f)
    both = parts[0] + parts[1]
    summed, largest = both.vectors()
    back = Figures.read(summed.tolist(), largest.tolist())
    for field in dataclasses.fields(Figures):
        a, b = (getattr(p, field.name).numpy() for p in parts)
        want = max(a, b) if field.name == "logit_max" else a + b
        assert getattr(back, field.name) == pytest.approx(want, rel=1e-12), field.name
    assert len(back.modality_real) == len(MODALITY_NAMES)


def test_connect_checks_the_data_and_hands_back_the_link(tmp_path_factory, tmp_path):
    root = shared_root(tmp_path_factory)
    module = MioModule(str(root / "base"), extend_vocab=True)
    data = MioDataModule([DatasetSpec("image_text"), DatasetSpec("speech_text")], root=str(root / "data"),
                         context_length=256, backbone=str(root / "base"), extend_vocab=True, pack=False)
    module.connect(data, stage_dir=tmp_path)
    assert isinstance(module.data, DataLink) and module.data.pack is False
    assert module.data.report is data.report and data.report.out_dir == tmp_path
    assert sorted(module.data.specs) == ["image", "speech"] and all("content" in s for s in module.data.specs.values())
    assert data.tokenizer is module.tokenizer and data.table is module.table
    data.setup("fit")  # the mixture renders with the model's tokenizer
    assert data.mixture is not None
    short = MioDataModule([DatasetSpec("text")], root=str(root / "data"), context_length=2000,
                          backbone=str(root / "base"))
    with pytest.raises(ValueError, match="data.context_length 2000 .* max_position_embeddings 1024"):
        module.connect(short, stage_dir=tmp_path)
