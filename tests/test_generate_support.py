"""Shared, built-once pieces of the generation tests (no tests here).

Random models that *use* media: a tiny Phi (whose output layer has a bias) extended with
mio's tokens, the bias pushing ``<image>``/``<spch>`` up so that random generations are
interleaved. The tiny tokenizers and the tiny unCLIP pipeline are built once per session.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_SEED = ROOT / "tokenizers" / "tiny" / "seed.yaml"
TINY_SPEECH = ROOT / "tokenizers" / "tiny" / "speechtokenizer.yaml"
SAMPLES = ROOT / "data_recipes" / "samples"
CORPUS = ["a cat sitting on a mat", "hello world", "please generate an image of", "transcribe this speech",
          "You are MIO, an AI assistant", "user", "assistant", "system"] * 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run one op at a time: a second OpenMP thread only spins, and on a shared,
    busy machine it made each forward ~8x slower. Imported by the generation test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def text_tokenizer() -> Any:
    from mio.model.backbone import train_text_tokenizer

    return train_text_tokenizer(CORPUS, vocab_size=300)


@functools.cache
def tiny_media() -> Any:
    """MediaTokenizers over the tiny SEED and SpeechTokenizer specs, both already built."""
    from mio.tokenizers.media_tokenizers import MediaTokenizers, SpecSource
    from mio.vocab import IMAGE, SPEECH

    media = MediaTokenizers({IMAGE: SpecSource(str(TINY_SEED), str(TINY_SEED)),
                             SPEECH: SpecSource(str(TINY_SPEECH), str(TINY_SPEECH))})
    media.get(IMAGE), media.get(SPEECH)
    return media


@functools.cache
def tiny_unclip() -> Any:
    from mio.generate.detok import TinyUnclipConfig, tiny_unclip_pipeline

    return tiny_unclip_pipeline(TinyUnclipConfig(embed_dim=tiny_media().get("image").embed_dim))


def media_model(seed: int = 0, image_bias: float = 4.0, speech_bias: float = 4.0, stop_bias: float = 0.0,
                scale: float = 1.0) -> tuple[Any, Any, Any]:
    """(model, tokenizer, table): a random tiny Phi extended with mio's tokens, MIO's layout.

    ``scale`` multiplies the output weights (sharper distributions); the biases add to the
    logits of ``<image>``, ``<spch>`` and the stop tokens.
    """
    from transformers import PhiConfig, PhiForCausalLM

    from mio.vocab import extend_backbone

    tok = copy.deepcopy(text_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PhiForCausalLM(PhiConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
        table = extend_backbone(model, tok)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
            bias = model.lm_head.bias
            bias[table.image_begin] += image_bias
            bias[table.speech_begin] += speech_bias
            for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
                bias[i] += stop_bias
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    return model.eval(), tok, table


def spec_record(path: Path) -> dict[str, Any]:
    """How `mio fit` records a tokenizer spec in a model folder."""
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "content": yaml.safe_load(path.read_text())}


def save_media_model(out: Path, **kwargs: Any) -> Path:
    """A model folder as `mio fit` leaves it: model, tokenizer, table and tokenizer specs."""
    from mio.model.backbone import save_model_folder

    model, tok, table = media_model(**kwargs)
    specs = {"image": spec_record(TINY_SEED), "speech": spec_record(TINY_SPEECH)}
    return save_model_folder(model, tok, table, out, tokenizer_specs=specs)
