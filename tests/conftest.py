"""Shared fixtures: tiny text tokenizers and backbones built from configs (never downloaded)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

CORPUS = [
    "a cat sitting on a mat", "the caption of this image is", "please generate an image of",
    "transcribe this speech", "a red rocket on the launch pad", "hello world", "coffee in a white cup",
    "Please describe the following video", "You are MIO, an AI assistant", "speech", "generate a video for",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def text_tokenizer():
    from mio.model.backbone import train_text_tokenizer

    return train_text_tokenizer(CORPUS * 4, vocab_size=400)


@pytest.fixture(scope="session")
def mio_tokenizer(text_tokenizer):
    """The tiny text tokenizer extended with mio's tokens (at VocabTable.mio_default(len(text_tokenizer)))."""
    from mio.vocab import extend_tokenizer

    tok = copy.deepcopy(text_tokenizer)
    extend_tokenizer(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A text-only tiny Llama folder (model + tokenizer), as a user's base model would be."""
    from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone

    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, text_vocab_size=400)
    return build_tiny_backbone(CORPUS * 4, cfg, tmp_path_factory.mktemp("base"))
