"""Loading, extending and saving the backbone: any Hugging Face causal LM from a local folder.

Also builds the tiny flavor used by tests and the demo: a byte-level BPE text tokenizer
trained on the given texts and a small Llama built from a config (random weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mio.log import info
from mio.model.attention import effective_backend
from mio.model.saved_tokenizer import check_round_trip, save_tokenizer
from mio.userio import MioUserError
from mio.vocab import CHAT_MARKERS, LocationTokens, VocabTable, extend_backbone, folder_table, stop_ids

TOKENIZER_SPECS_FILE = "mio_tokenizers.json"


@dataclass
class TinyLlamaConfig:
    """The tiny flavor of the backbone: small enough to train in seconds on a CPU."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    text_vocab_size: int = 1024
    tie_word_embeddings: bool = False
    seed: int = 0


def train_text_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``: it round-trips any string exactly. Like
    Llama's, it puts BOS before every text it encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", *CHAT_MARKERS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", extra_special_tokens=list(CHAT_MARKERS), add_bos_token=True)


def build_tiny_backbone(texts: Iterable[str], config: TinyLlamaConfig, out_dir: str | os.PathLike) -> Path:
    """Train the tiny text tokenizer, build a random tiny Llama whose embedding matches it,
    and save both as a plain ``save_pretrained`` folder (a text-only base model)."""
    tokenizer = train_text_tokenizer(texts, config.text_vocab_size)
    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(llama)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    (out / "mio_tiny_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out


def load_backbone(path: str | os.PathLike, attn_implementation: str = "sdpa", extend: bool = False,
                  dtype: torch.dtype = torch.float32, weights: bool = True,
                  locations: LocationTokens | None = None) -> tuple[Any, Any, VocabTable]:
    """Load a causal LM and its tokenizer from a local folder (never a hub).

    ``extend=True`` takes a text-only backbone and adds mio's tokens, then checks once that the
    extended tokenizer, saved as a stage saves it and reloaded by vanilla ``AutoTokenizer``, tokenizes
    as it does (mio.model.saved_tokenizer); otherwise the folder must already be extended (its table
    file, or MIO's added tokens, says how).
    ``weights=False`` builds the same model from its config on the meta device, reading no
    weights and taking no memory (sharded training loads the weights after sharding).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json). Give the local folder of a Hugging "
                                f"Face causal LM (a stage's model.backbone, mio generate's --model); mio never "
                                f"downloads one. A tiny one to try things: mio tiny-base PREPARED_DATA_DIR --out {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = load_model(folder, attn_implementation, dtype, weights)
    if locations is not None and not extend:
        raise MioUserError(f"{folder}: location tokens are added when a stage extends a text-only backbone "
                           "(model.extend_vocab: true); this folder's vocabulary table is already fixed")
    if extend:
        table = extend_backbone(model, tokenizer, locations=locations)
        check_round_trip(tokenizer, table, folder)
    else:
        table = folder_table(folder, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < table.total_size:
        raise MioUserError(f"{folder}: model has {rows} embedding rows, its vocabulary table needs {table.total_size}")
    return model, tokenizer, table


def load_model(folder: str | os.PathLike, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               weights: bool = True) -> Any:
    """``from_pretrained`` from a local folder (``weights=False``: the same model built from its config
    on the meta device). A family whose transformers code has no SDPA path (Gemma 2, BLOOM, ...)
    gets eager attention instead, with one line saying so, not a crash."""
    # No implementation named: transformers' own choice, SDPA where the family has it, else eager.
    model = _build_model(folder, None if attn_implementation == "sdpa" else attn_implementation, dtype, weights)
    if weights and effective_backend(model, attn_implementation) == "eager" != attn_implementation:
        info(f"{type(model).__name__} has no SDPA attention in transformers {transformers.__version__}: "
             "using eager attention (the same packed masks, as additive masks)")
    return model


def _build_model(folder: str | os.PathLike, attn_implementation: str | None, dtype: torch.dtype, weights: bool) -> Any:
    if weights:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                    attn_implementation=attn_implementation)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True),
                                                dtype=dtype, attn_implementation=attn_implementation)


def save_model_folder(model: Any, tokenizer: Any, table: VocabTable, out_dir: str | os.PathLike,
                      tokenizer_specs: dict[str, Any] | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A plain ``save_pretrained`` folder that vanilla transformers loads, plus mio's table
    and the modality tokenizer specs the model was trained with (for `mio generate`). The tokenizer
    is saved with every setting that decides its ids (mio.model.saved_tokenizer.save_tokenizer).
    ``state_dict``: the full weights when ``model`` holds only shards (FSDP2)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    save_tokenizer(tokenizer, out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids(tokenizer),
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    table.save(out)
    if tokenizer_specs is not None:
        (out / TOKENIZER_SPECS_FILE).write_text(json.dumps(tokenizer_specs, indent=2) + "\n")
    return out


def load_tokenizer_specs(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(model_dir) / TOKENIZER_SPECS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
