"""The model's own forward over a packed batch, its output layer run on supervised positions only.

Training must optimize the logits the architecture computes, and families differ after their
decoder: Gemma 2/3 soft-cap the final logits, Granite divides them by ``logits_scaling``, Cohere
multiplies them by ``logit_scale``. So mio calls the model's own forward (never the decoder plus
the bare output embedding) and keeps the memory saving through transformers' ``logits_to_keep``:
a (B, L) boolean mask makes the forward run its output layer, and whatever follows it, on the kept
positions only, returning (N, V) logits. (B, L, V) logits of a 76k vocabulary would be most of a
step's activation memory, and SFT supervises a small part of each pack.

MoE families return their router load-balancing loss with ``output_router_logits=True``, computed
by their own code over the tokens the 2D attention mask marks as real. mio's packed rows need a
document mask for attention, which that code cannot take, so the forward gets the 2D mask of real
tokens (padding excluded) and the decoder inside it gets the packed-attention mask (a forward
pre-hook swaps it in for that one call).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.model.attention import ATTENTION_LAYER_TYPES, attention_windows, packed_attention_kwargs
from mio.userio import MioUserError
from mio.vocab import IGNORE_INDEX

# Token mixers that carry state along the whole row (transformers' class names): state-space,
# recurrent, linear-attention and short-convolution layers.
STATEFUL_MIXERS = re.compile(r"Mamba|SSM|Rwkv|RWKV|Recurrent|LinearAttention|DeltaNet|ShortConv|LSTM|Mixer$")


@dataclass
class SupervisedOutput:
    logits: torch.Tensor  # (N, V): the model's own logits at the kept positions, in row-major order
    aux_loss: torch.Tensor | None  # MoE router load-balancing loss over real tokens (unweighted); None without


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions whose next token is a supervised label (the logit at t predicts t+1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def router_aux_coefficient(model: Any) -> float:
    """The weight of the router load-balancing loss the model's config asks for (0: none).

    Only models whose forward can return that loss (``output_router_logits``) have one."""
    coefficient = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    return coefficient if coefficient and _accepts(model, "output_router_logits") else 0.0


def supervised_logits(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor, backend: str = "sdpa",
                      aux_loss: bool = False) -> SupervisedOutput:
    """The model's own logits at ``keep`` ((B, L) bool, see :func:`supervised_positions`) of a packed
    batch, samples isolated by the attention ``backend``; and, with ``aux_loss``, its router loss."""
    base = _unwrapped(model)
    windows = None if batch.get("one_sample_per_row") else attention_windows(base.config)
    attention = packed_attention_kwargs(backend, batch, windows, dtype=base.dtype)
    # A family without `logits_to_keep` computes (B, L, V) logits, of which the kept ones are taken.
    kept = _accepts(model, "logits_to_keep")
    if kept:
        attention["logits_to_keep"] = keep
    if not aux_loss:
        out = model(input_ids=batch["input_ids"], use_cache=False, **attention)
        return SupervisedOutput(out.logits if kept else out.logits[keep], None)
    real = (batch["document_ids"] >= 0).long()  # (B, L): the router loss counts real tokens only
    isolation = attention.pop("attention_mask", None)  # the 2D padding mask itself for one sample per row
    packed = not batch.get("one_sample_per_row")
    with _decoder_attention_mask(model, isolation) if packed else contextlib.nullcontext():
        out = model(input_ids=batch["input_ids"], attention_mask=real, use_cache=False, output_router_logits=True,
                    **attention)
    return SupervisedOutput(out.logits if kept else out.logits[keep], out.aux_loss)


@contextlib.contextmanager
def _decoder_attention_mask(model: Any, mask: Any) -> Iterator[None]:
    """While inside, the model's decoder is called with ``attention_mask=mask``, whatever its caller passes."""

    def swap(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "attention_mask": mask}

    handle = model.get_decoder().register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _unwrapped(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (whose forward takes ``**kwargs`` and passes them on)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts(model: Any, argument: str) -> bool:
    return argument in _forward_parameters(type(_unwrapped(model)))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


class PackingError(MioUserError):
    """A backbone whose packed samples an attention mask cannot keep apart."""


def packing_refusal(model: Any) -> str | None:
    """Why an attention mask cannot isolate samples packed into one row of this model (None: it can).

    Recurrent and hybrid backbones (Mamba, Jamba, Falcon-H1, Bamba, ...) run a state along the whole
    row: ``config.layer_types`` names their non-attention layers, and their modules are state-space,
    recurrent or convolutional token mixers."""
    base = _unwrapped(model)
    layers = set(getattr(base.config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES)
    mixers = {type(m).__name__ for m in base.modules()
              if isinstance(m, torch.nn.Conv1d) or STATEFUL_MIXERS.search(type(m).__name__)}
    if layers or mixers:
        return (f"{type(base).__name__} has recurrent or convolutional layers ({', '.join(sorted(layers | mixers))}) "
                "whose state runs along the whole row: an attention mask cannot keep packed samples apart")
    return None


def check_packing(model: Any, backend: str, tolerance: float | None = None) -> None:
    """Refuse to train ``model`` on packed rows when its packed samples would not be isolated: a
    recurrent or hybrid backbone (:func:`packing_refusal`), a family whose forward fails under the
    packed-attention mask, or one whose second sample of a packed probe row is not what it is alone
    (relative error over ``tolerance``: default 1e-3 in float32, 5e-2 in 16-bit precision)."""
    reason = packing_refusal(model) or _probe(model, backend, tolerance)
    if reason is not None:
        raise PackingError(f"{reason}. Set data.pack: false to train it with one sample per row (padded).")


def _probe(model: Any, backend: str, tolerance: float | None) -> str | None:
    """Two samples packed into one row through the training forward, against each sample alone."""
    base = _unwrapped(model)
    if tolerance is None:
        tolerance = 1e-3 if base.dtype == torch.float32 else 5e-2
    vocab = int(base.config.get_text_config().vocab_size)  # not the weight: under FSDP2 it is sharded
    samples = [TokenSample(np.arange(1, n + 1) % vocab, np.arange(1, n + 1) % vocab) for n in (5, 6)]
    packs = list(BestFitPacker(context_length=11, buffer_size=1)(samples))
    batch = {k: v.to(base.device) if isinstance(v, torch.Tensor) else v for k, v in collate_packs(packs).items()}
    keep = supervised_positions(batch["labels"])
    name = type(base).__name__
    training = model.training
    model.eval()  # no dropout: the two runs must be comparable
    try:
        with torch.no_grad():
            try:
                packed = supervised_logits(model, batch, keep, backend).logits.float()  # (9, V): 4 + 5 positions
            except Exception as err:  # noqa: BLE001 -- any failure here is the family refusing the mask
                return f"{name} fails under mio's packed-attention mask ({type(err).__name__}: {err})"
            second = batch["input_ids"][:, 5:]  # (1, 6): the second sample alone
            alone = model(input_ids=second, use_cache=False).logits[0, :-1].float()  # (5, V)
    finally:
        model.train(training)
    error = ((packed[4:] - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()
    if error > tolerance:
        return (f"packed samples are not isolated in {name}: the second of two packed samples is {error:.1%} "
                "away from its logits alone")
    return None
