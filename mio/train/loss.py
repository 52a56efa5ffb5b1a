"""The training loss: every supervised token of the global batch weighs the same.

Averaging per micro-batch (or per rank) would give a token in a sparsely supervised micro-batch
more weight than one in a dense micro-batch, so packing and gradient accumulation would change
what a sample contributes. Instead each micro-batch's loss is its cross-entropy SUM divided by the
number of supervised tokens of its whole optimizer step (all micro-batches, all ranks); the
micro-batch losses of one step then add up to the global token mean. ``MioModule.training_step``
computes its loss with these functions, and the tests check them.

z-loss (PaLM; Chameleon and Lumina-mGPT at weight 1e-5) pulls each supervised position's
``logsumexp(logits)`` towards 0, so output logits cannot drift out of bf16's range: its per-token
term ``logsumexp^2`` (:func:`token_logsumexp`, float32, from the cross-entropy itself) at the same
shifted, supervised positions
as the loss goes through :func:`micro_batch_loss` like the cross-entropy, so it is a mean over
the global batch's supervised tokens, whatever the number of processes.

Logits are the model's own, at the supervised positions only (``mio.model.forward``): (N, V) in
row-major order, the order of :func:`supervised_targets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mio.vocab import IGNORE_INDEX


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N,): the supervised labels of a (B, L) batch in row-major order -- the token each kept
    position predicts (the logit at t predicts the label at t+1)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def supervised_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of supervised targets of a (B, L) batch (a tensor on its device: no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of each supervised token, computed in float32 from (N, V) logits of any dtype."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_cross_entropy: logits must be (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return F.cross_entropy(logits.float(), targets, reduction="none")


def token_logsumexp(logits: torch.Tensor, targets: torch.Tensor, token_loss: torch.Tensor) -> torch.Tensor:
    """(N,) ``logsumexp`` of each supervised position's logits (N, V), float32, from its
    cross-entropy (:func:`token_cross_entropy`): ``ce = lse - logit[target]``, so ``lse = ce +
    logit[target]``, without a second pass over the (N, V) logits; its gradient is the softmax, as
    logsumexp's. ``logits``: the float32 ones the loss was computed from (a lower precision would
    round the two gradients before they cancel at the target)."""
    return token_loss + logits.gather(1, targets[:, None]).squeeze(1)


def step_tokens(count: torch.Tensor) -> torch.Tensor:
    """This rank's supervised-token count of an optimizer step, summed over ranks when
    torch.distributed is initialized (an all-reduce on the device, no host sync); float64."""
    total = count.to(torch.float64).clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total


def micro_batch_loss(token_loss: torch.Tensor, step_count: torch.Tensor | int, replicas: int = 1) -> torch.Tensor:
    """A micro-batch's share of its step's token mean: ``token_loss.sum() / step_count * replicas``.

    ``step_count``: supervised tokens of the whole optimizer step (:func:`step_tokens`); 0 counts
    as 1, so a step without supervision gives 0, not NaN. ``replicas``: world size x gradient
    accumulation, undoing DDP's mean over ranks and Lightning's over micro-batches (1 where the
    caller sums the micro-batch losses itself).
    """
    count = torch.as_tensor(step_count, dtype=torch.float64, device=token_loss.device).clamp(min=1)
    return (token_loss.sum() / count * replicas).to(token_loss.dtype)
