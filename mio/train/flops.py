"""Model FLOPs of a packed training step, counted per real sample, and the device's peak.

A packed row holds several samples that never attend to each other, so attention costs what each
sample costs alone: it grows with the square of the sample's own length, not the pack's. For a
step over samples of lengths ``s_i`` with ``N`` supervised targets:

    matmuls     6 x P_body x sum(s_i)        (P_body: weight-matrix parameters of the decoder layers)
    output      6 x P_head x N               (the output layer runs on supervised positions only)
    attention   6 x layers x width x sum(s_i x (s_i + 1))

6 = 2 (multiply-add) x 3 (forward + backward). Attention is causal: query ``t`` meets ``t + 1``
keys in QK^T and again in AV, i.e. ``2 x 2 x width x s(s+1)/2`` forward FLOPs per layer, where
``width`` = query heads x head dim. Padding, embedding lookups, norms and activations count
nothing, and nor does recomputation under activation checkpointing: this is *model* FLOPs, the
numerator of MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopCounts:
    """The sizes of a causal LM that its training FLOPs depend on."""

    body_params: int  # weight matrices inside the decoder layers
    head_params: int  # the output layer's weight (vocab x hidden)
    layers: int
    attention_width: int  # query heads x head dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> "FlopCounts":
        """Counted from a Hugging Face causal LM (plain or PEFT-wrapped) before any sharding."""
        config = model.config
        decoder = model.get_decoder()
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        embedding = decoder.get_input_embeddings().weight.numel()  # a lookup, not a matmul
        body = sum(p.numel() for p in decoder.parameters() if p.ndim >= 2) - embedding
        head = model.get_output_embeddings().weight.numel()
        return cls(body_params=body, head_params=head, layers=layers, attention_width=heads * head_dim)

    def step_flops(self, seq_lens: torch.Tensor, supervised: int | torch.Tensor) -> torch.Tensor:
        """Training FLOPs (a float64 tensor on ``seq_lens``' device: no host sync) for samples of
        lengths ``seq_lens`` (1-D) with ``supervised`` targets."""
        s = seq_lens.to(torch.float64)
        n = torch.as_tensor(supervised, dtype=torch.float64, device=s.device)
        attention = 6.0 * self.layers * self.attention_width * (s * (s + 1)).sum()
        return 6.0 * self.body_params * s.sum() + 6.0 * self.head_params * n + attention


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for the trainer's precision, or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None
