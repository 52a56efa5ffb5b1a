"""The three kinds of text tokenizer real backbones bring, built offline and small:

- ``sentencepiece``: SentencePiece BPE with byte fallback and the dummy prefix (Llama 2, Yi, Mistral),
  trained with ``sentencepiece``'s own trainer and saved as ``tokenizer.model`` only, then loaded
  the way transformers loads a Llama tokenizer from that file, with ``legacy`` true or false (or, in
  ``SENTENCEPIECE_KINDS`` only, unset);
- ``byte_level``: byte-level BPE, GPT-2 style (``GPT2Tokenizer``) and Qwen2 style (``Qwen2Tokenizer``:
  NFC and Qwen2's split regex);
- ``llama3``: byte-level BPE behind a Llama 3 split regex, BOS added by its template.

The training text is generated here (a fixed word list and some non-Latin text, so byte
fallback and multi-byte characters occur); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

WORDS = ("the a cat dog red rocket launch pad sky caption of this image is please generate an speech "
         "transcribe describe following video hello world coffee white cup you are assistant user system "
         "über café naïve 東京 猫 데이터 привет").split()
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KINDS = ("sentencepiece_legacy", "sentencepiece", "gpt2", "qwen2", "llama3")
# Each SentencePiece kind's tokenizer_config.json ``legacy`` (None: the key is absent).
SENTENCEPIECE_KINDS = {"sentencepiece_legacy": True, "sentencepiece": False, "sentencepiece_unset": None}


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice(["", ".", ":", "!", "\n", "  "]))
    return lines


def sentencepiece_folder(out: Path, legacy: bool | None, vocab_size: int = 400) -> Path:
    """A Llama-2-style tokenizer folder: ``tokenizer.model`` (SentencePiece BPE, byte fallback,
    dummy prefix) and a ``tokenizer_config.json`` naming LlamaTokenizer, BOS added (``legacy``
    None: the config does not say)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if legacy is None:
        del config["legacy"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _byte_level_bpe(pre_tokenizer: Any, vocab_size: int, specials: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _vocab_and_merges(tok: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build(kind: str, tmp: Path) -> Any:
    """A text tokenizer of the given kind (see KINDS and SENTENCEPIECE_KINDS), as transformers loads it."""
    from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    from tokenizers import Regex, pre_tokenizers, processors

    if kind in SENTENCEPIECE_KINDS:
        folder = sentencepiece_folder(tmp / kind, legacy=SENTENCEPIECE_KINDS[kind])
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if kind in ("gpt2", "qwen2"):
        tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), 500, ["<|endoftext|>"])
        vocab, merges = _vocab_and_merges(tok)
        cls = GPT2Tokenizer if kind == "gpt2" else Qwen2Tokenizer
        return cls(vocab=vocab, merges=merges)
    if kind == "llama3":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok = _byte_level_bpe(pre, 500, ["<|begin_of_text|>", "<|end_of_text|>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>")
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS} or {tuple(SENTENCEPIECE_KINDS)}")
