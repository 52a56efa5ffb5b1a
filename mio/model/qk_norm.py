"""QK-norm where the backbone allows it (``model.qk_norm``).

Chameleon (arXiv:2405.09818, sec. 2.3) kept the output norms of a mixed-modal model inside bf16's
range with QK-norm, z-loss and dropout: a per-head RMSNorm of queries and keys bounds the
attention logits however the projections grow.

- A family with it built in (Qwen3, OLMo 2, Gemma 3, Chameleon) keeps it: nothing to do.
- A Llama-family backbone (Llama, Mistral: the same decoder layer) becomes the same weights in
  Qwen3's layout, which is Llama's plus a per-head RMSNorm (over ``head_dim``, shared by the
  heads) of the projected queries and keys before the rotary embedding; Mistral's sliding window
  becomes Qwen3's, on every layer as Mistral has it. The stage's output is then a plain Qwen3
  folder that vanilla transformers loads. Each norm's weight starts at the backbone's own mean
  per-head RMS of that layer's queries (keys) on a calibration batch -- the stage's first
  micro-batch -- so a query of typical size passes unchanged. What no weight keeps is each
  token's own query and key size: a random backbone's first loss does not move, a trained one's
  jumps (README, Long runs), hence converting at the first stage.
- Any other family is refused, naming the ones that work.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

BUILT_IN = {"qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma3", "gemma3_text", "chameleon"}
CONVERTED = {"llama", "mistral"}
NORMS = ("q_norm", "k_norm")


class QkNormError(ValueError):
    """``model.qk_norm`` on a backbone mio cannot give QK-norm."""


def has_qk_norm(model: Any) -> bool:
    return model.config.model_type in BUILT_IN


def check_convertible(config: Any, backbone: str) -> None:
    kind = config.model_type
    if kind in BUILT_IN or kind in CONVERTED and not getattr(config, "mlp_bias", False):
        return
    what = f"a {kind} with MLP biases (Qwen3's MLP has none)" if kind in CONVERTED else f"a {kind} backbone"
    raise QkNormError(f"model.qk_norm: {backbone} is {what}; mio gives QK-norm to Llama-family backbones "
                      f"({', '.join(sorted(CONVERTED))}; as Qwen3's layout) and keeps it in "
                      f"{', '.join(sorted(BUILT_IN))}. Drop model.qk_norm for this backbone")


def qwen3_config(config: Any) -> Qwen3Config:
    """Qwen3's config for the Llama or Mistral ``config``: the same shapes, rotary settings,
    attention window and token ids (Mistral has no ``attention_bias``: none)."""
    window = getattr(config, "sliding_window", None)  # Mistral's, on every layer; Llama has none
    return Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim or config.hidden_size // config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=False, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=config.rope_parameters, attention_bias=getattr(config, "attention_bias", False),
        attention_dropout=config.attention_dropout, use_sliding_window=window is not None, sliding_window=window,
        max_window_layers=0, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)


def skeleton(model: Any, attn_implementation: str | None) -> Any:
    """The Qwen3 structure of a Llama model, on the meta device (no weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(qwen3_config(model.config), attn_implementation=attn_implementation)


@torch.no_grad()
def head_scales(model: Any, input_ids: torch.Tensor, real: torch.Tensor) -> list[tuple[float, float]]:
    """Per decoder layer, the mean RMS over ``head_dim`` of the projected queries and keys, over
    the heads and the ``real`` (B, L) positions of a plain forward of ``input_ids`` (B, L)."""
    head_dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads
    found: dict[tuple[int, str], float] = {}

    def record(layer: int, name: str) -> Any:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            heads = out.float().unflatten(-1, (-1, head_dim))  # (B, L, H, D)
            rms = heads.pow(2).mean(-1).sqrt()  # (B, L, H)
            found[(layer, name)] = float(rms[real].mean())
        return hook

    layers = model.model.layers
    handles = [getattr(layer.self_attn, proj).register_forward_hook(record(i, proj))
               for i, layer in enumerate(layers) for proj in ("q_proj", "k_proj")]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(found[(i, "q_proj")], found[(i, "k_proj")]) for i in range(len(layers))]


@torch.no_grad()
def with_qk_norm(model: Any, batch: dict[str, torch.Tensor], attn_implementation: str | None) -> Any:
    """The Llama (or Mistral) ``model``'s weights in Qwen3's layout, its norms calibrated on
    ``batch`` (a micro-batch: ``input_ids``, ``labels``, ``document_ids``). Prints the loss on the
    batch before and after (a plain forward over its rows)."""
    real = batch["document_ids"] >= 0  # (B, L)
    labels = batch["labels"]
    before = float(model(input_ids=batch["input_ids"], labels=labels, use_cache=False).loss)
    scales = head_scales(model, batch["input_ids"], real)
    converted = AutoModelForCausalLM.from_config(qwen3_config(model.config), attn_implementation=attn_implementation,
                                                 dtype=model.dtype)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.rsplit(".", 2)[-2] in NORMS for k in missing), (missing, unexpected)
    for layer, (q, k) in zip(converted.model.layers, scales):
        layer.self_attn.q_norm.weight.fill_(q)
        layer.self_attn.k_norm.weight.fill_(k)
    after = float(converted(input_ids=batch["input_ids"], labels=labels, use_cache=False).loss)
    print(f"[mio] model.qk_norm: {type(model).__name__} -> {type(converted).__name__} (per-head q/k RMSNorm, "
          f"calibrated); loss on the stage's first micro-batch {before:.4f} -> {after:.4f}", file=sys.stderr, flush=True)
    converted.train(model.training)
    return converted
