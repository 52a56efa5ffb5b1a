"""The packed-training loss: every supervised token of the global batch weighs the same.

Averaging per micro-batch (or per rank) would give a token in a sparsely supervised micro-batch
more weight than one in a dense micro-batch, so packing and gradient accumulation would change
what a sample contributes. Instead each micro-batch returns its cross-entropy SUM divided by the
number of supervised tokens of the whole global batch (all micro-batches, all ranks); the
micro-batch losses of one optimizer step then add up to the global token mean.

Under DDP, which averages gradients over ranks, multiply the loss by the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) bool: the positions whose shifted label is supervised (the logit at t predicts label t+1)."""
    return labels[:, 1:] != IGNORE_INDEX


def packed_loss(logits: torch.Tensor, labels: torch.Tensor, num_global_tokens: torch.Tensor | int) -> torch.Tensor:
    """Cross-entropy of shifted logits summed over supervised tokens, divided by ``num_global_tokens``.

    Args:
        logits: (B, L, V), any float dtype (computed in float32).
        labels: (B, L) aligned with the inputs (not shifted), -100 where unsupervised.
        num_global_tokens: supervised tokens of the global batch (``global_supervised_tokens``);
            0 is treated as 1 so a batch without supervision gives 0, not NaN.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"packed_loss: logits must be (B, L, V) and labels (B, L), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab).float()  # (B*(L-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    denominator = torch.as_tensor(num_global_tokens, dtype=torch.float32, device=total.device).clamp(min=1)
    return total / denominator


def global_supervised_tokens(labels_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Supervised (shifted) tokens over the micro-batches of one optimizer step, summed over ranks.

    All-reduced when torch.distributed is initialized, so every rank gets the same count.
    """
    if not labels_list:
        raise ValueError("global_supervised_tokens: no micro-batches given")
    count = sum(supervised_targets(labels).sum() for labels in labels_list).to(torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    return count
