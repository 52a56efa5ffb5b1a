"""A tiny copy of MIO's released model folder, laid out as the release ships it (no tests here).

- ``config.json``: ``LlamaForCausalLM`` with the release's fields (``text_vocab_size``,
  ``num_new_special_tokens``, ``speech_placeholder_id`` ... ``image_bos_id``, ``vocab_size``);
- a SentencePiece tokenizer as Yi's: ``tokenizer.model`` (byte fallback, ``<|im_start|>`` and
  ``<|im_end|>`` at ids 6 and 7) with ``tokenizer_config.json`` naming the slow ``LlamaTokenizer``,
  and MIO's 12,294 added tokens in its order: the 6 specials (placeholders under names that are not
  mio's), ``<img0..8191>``, ``<spch0..4095>``;
- ``seed-tokenizer-2/{seed_quantizer.pt,eva_vit_g.pth}``, ``SpeechTokenizer/{config.json,SpeechTokenizer.pt}``
  and ``stable-diffusion-2-1-unclip/``: tiny random weights under the released file names.

No mio file (``mio_vocab.json``, ``mio_tokenizers.json``) is in it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from test_generate_support import TINY_SPEECH, tiny_media, tiny_unclip
from test_seed_checkpoint import write_release

CORPUS = ["a cat sitting on a mat", "hello world", "please generate an image of a red rocket",
          "transcribe this speech", "You are MIO, an AI assistant capable of understanding images",
          "The transcription is", "Please generate a speech according to the given transcription.",
          "user", "assistant", "system", "Start with <spch>.", "1 2 3 4 5 6 7 8 9 0"] * 8
YI_SPECIALS = ["<|Human|>", "<|Assistant|>", "<|System|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"]  # ids 3..8
# MIO's 6 new tokens at V .. V+5. The release states their ids (config.json) and the names of the
# four block markers; the placeholders' names here are deliberately not the ones mio gives them.
RELEASE_SPECIALS = ["<speech_pad>", "</spch>", "<image_pad>", "<spch>", "</image>", "<image>"]
CONFIG_FIELDS = ("speech_placeholder_id", "speech_eos_id", "image_placeholder_id", "speech_bos_id", "image_eos_id",
                 "image_bos_id")


def sentencepiece_model(vocab_size: int = 400) -> bytes:
    """A BPE SentencePiece model trained as Llama/Yi's are set up (byte fallback, dummy prefix)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<|startoftext|>",
        eos_piece="<|endoftext|>", user_defined_symbols=YI_SPECIALS, minloglevel=2)
    return out.getvalue()


def write_tokenizer(out: Path) -> int:
    """Yi's tokenizer files with MIO's added tokens -> the text vocabulary size V."""
    import sentencepiece as spm

    model = sentencepiece_model()
    text_size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    (out / "tokenizer.model").write_bytes(model)
    added = RELEASE_SPECIALS + [f"<img{i}>" for i in range(8192)] + [f"<spch{i}>" for i in range(4096)]
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(i): {"content": t, **entry, "special": True} for i, t in enumerate(["<unk>", "<|startoftext|>",
                                                                                        "<|endoftext|>"])}
    decoder |= {str(text_size + i): {"content": t, **entry, "special": False} for i, t in enumerate(added)}
    (out / "added_tokens.json").write_text(json.dumps({t: text_size + i for i, t in enumerate(added)}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "sp_model_kwargs": {},
        "added_tokens_decoder": decoder}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                             "unk_token": "<unk>", "pad_token": "<unk>"}))
    return text_size


def write_model(out: Path, text_size: int, seed: int = 0) -> None:
    """A tiny LlamaForCausalLM whose config.json carries the release's layout fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(zip(CONFIG_FIELDS, [text_size + i for i in range(6)]))
    config = LlamaConfig(vocab_size=text_size + 6 + 8192 + 4096, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, text_vocab_size=text_size,
                         num_new_special_tokens=6, image_newline_id=fields["image_placeholder_id"], **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)


def write_media_folders(out: Path) -> dict[str, Any]:
    """The three tokenizer subfolders with the tiny tokenizers' weights -> the tiny SEED spec that
    reads the released SEED files (the release fixes SEED's architecture in code, not in a file)."""
    seed_spec = write_release(tiny_media().get("image").model, out)
    (out / "SpeechTokenizer").mkdir()
    (out / "SpeechTokenizer" / "config.json").write_text(json.dumps(yaml.safe_load(TINY_SPEECH.read_text())["model"]))
    torch.save(tiny_media().get("speech").model.state_dict(), out / "SpeechTokenizer" / "SpeechTokenizer.pt")
    tiny_unclip().save_pretrained(out / "stable-diffusion-2-1-unclip")
    return seed_spec


def build_release(out: Path) -> tuple[Path, Path]:
    """The fixture folder, and a folder holding only a tiny SEED spec (``--tokenizers`` for images)."""
    out.mkdir(parents=True)
    write_model(out, write_tokenizer(out))
    seed_spec = write_media_folders(out)
    specs = out.parent / f"{out.name}-tiny-seed"
    specs.mkdir()
    (specs / "seed.yaml").write_text(yaml.safe_dump(seed_spec))
    return out, specs
