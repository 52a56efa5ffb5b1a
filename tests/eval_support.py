"""Tiny random models behind `mio eval`'s metrics (no tests here): a CLIP and a Whisper built
from their configs, with character-level tokenizers over printable ASCII."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation))


def tiny_clip_folder(out: Path, flip: bool = False) -> Path:
    """A random CLIP with its processor, saved as a local folder (``flip``: text embeddings
    negated, so that every cosine changes sign)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(CHARS)} | {c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                             eos_token_id=vocab["<|endoftext|>"]),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16))
    if flip:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def tiny_whisper_folder(out: Path, says: str = "a") -> Path:
    """A random Whisper whose decoder always says ``says`` (one character) and stops: its last
    layer norm is zeroed to a constant, so the logits are the same at every step, end of text
    first and ``says`` second; Whisper's begin-suppression of end of text makes the first
    token ``says``, the second end of text. Whatever speech it hears, it transcribes ``says``."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(CHARS + ["Ġ"])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token=eot, bos_token=eot, eos_token=eot)
    tok.add_tokens([eot], special_tokens=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|startoftranscript|>", "<|notimestamps|>"]})
    end, start, no_ts = tok.convert_tokens_to_ids([eot, "<|startoftranscript|>", "<|notimestamps|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=len(tok), num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=1500, max_target_positions=64, pad_token_id=end, bos_token_id=end,
            eos_token_id=end, decoder_start_token_id=start, suppress_tokens=[], begin_suppress_tokens=[end]))
    with torch.no_grad():
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0  # logits = embeddings[:, 0]
        emb = model.model.decoder.embed_tokens.weight  # tied to the output layer
        emb[:, 0] = 0.0
        emb[end, 0], emb[vocab[says], 0] = 2.0, 1.0
    g = model.generation_config
    g.decoder_start_token_id, g.eos_token_id, g.pad_token_id, g.no_timestamps_token_id = start, end, end, no_ts
    g.forced_decoder_ids, g.max_length = None, 16
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=16), tokenizer=tok).save_pretrained(out)
    return out
