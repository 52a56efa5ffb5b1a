"""The one LightningModule of every stage: what trains is a setting, not a script."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mio.log import info
from mio.model.attention import effective_backend, hf_attn_implementation, pad_multiple
from mio.model.backbone import load_backbone, load_tokenizer_specs, save_model_folder
from mio.model.forward import (
    SupervisedOutput,
    check_packing,
    router_aux_coefficient,
    supervised_logits,
    supervised_positions,
)
from mio.model.lora import LoraSettings, apply_lora, parameter_report
from mio.model.qk_norm import check_convertible, has_qk_norm, skeleton, with_qk_norm
from mio.train.checkpoint import plain, rng_state, set_rng_state
from mio.train.data import DataLink, MioDataModule
from mio.train.flops import FlopCounts, peak_flops
from mio.train.guard import Guard, GuardSettings, SkippedStep, check_finite_weights
from mio.train.loss import micro_batch_loss, step_tokens, supervised_targets, token_cross_entropy, token_logsumexp
from mio.train.sharding import FSDP2Strategy, full_state_dict
from mio.userio import MioUserError
from mio.vocab import IGNORE_INDEX, MODALITY_NAMES, LocationTokens, VocabError, VocabTable

# How a figure adds up: over the micro-batches and steps of one rank, then over ranks.
SUMMED = {}  # a sum over micro-batches and over ranks
PER_STEP = {"ranks": "max"}  # a figure of the whole optimizer step, the same on every rank: summed over steps only
LARGEST = {"within": "max", "ranks": "max"}  # a maximum


@dataclass
class Figures:
    """The training loop's figures over some micro-batches (and optimizer steps) of one rank:
    float64 tensors on the device, (M,) per modality of MODALITY_NAMES; added up over ranks and
    read back at a logged step (:meth:`MioModule._summed_window`): plain floats and arrays."""

    loss_sum: Any = field(metadata=SUMMED)  # cross-entropy summed over the supervised tokens
    supervised: Any = field(metadata=SUMMED)  # supervised tokens
    real: Any = field(metadata=SUMMED)  # real (not padding) tokens
    capacity: Any = field(metadata=SUMMED)  # token slots of the rows
    flops: Any = field(metadata=SUMMED)  # model FLOPs of the forward and backward
    aux_loss: Any = field(metadata=SUMMED)  # an MoE backbone's router loss, summed over micro-batches
    micro_batches: Any = field(metadata=SUMMED)
    lse_sum: Any = field(metadata=SUMMED)  # logsumexp(logits) summed over the supervised positions scored for it
    lse_square_sum: Any = field(metadata=SUMMED)  # its square: the z-loss term before the weight
    lse_count: Any = field(metadata=SUMMED)  # the supervised positions of lse_sum
    modality_loss_sum: Any = field(metadata=SUMMED)  # (M,) per target modality
    modality_supervised: Any = field(metadata=SUMMED)  # (M,)
    modality_real: Any = field(metadata=SUMMED)  # (M,) real tokens of each modality
    modality_lse_sum: Any = field(metadata=SUMMED)  # (M,)
    modality_lse_count: Any = field(metadata=SUMMED)  # (M,)
    logit_max: Any = field(metadata=LARGEST)  # the largest |logit| at a supervised position
    grad_norm_sum: Any = field(metadata=PER_STEP)  # the gradient norm before clipping, summed over steps
    clipped: Any = field(metadata=PER_STEP)  # steps whose gradient norm was over trainer.gradient_clip_val
    steps: Any = field(metadata=PER_STEP)  # optimizer steps

    def __add__(self, other: "Figures") -> "Figures":
        def add(f: Any) -> Any:
            a, b = getattr(self, f.name), getattr(other, f.name)
            return torch.maximum(a, b) if f.metadata.get("within") == "max" else a + b

        return Figures(**{f.name: add(f) for f in fields(self)})

    @classmethod
    def zeros(cls, device: torch.device) -> "Figures":
        return cls(**{f.name: torch.zeros(len(MODALITY_NAMES) if f.name.startswith("modality_") else (),
                                          dtype=torch.float64, device=device) for f in fields(cls)})

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((S,) the figures summed over ranks, (X,) those whose largest over ranks counts), in field order."""
        def part(reduce: str) -> torch.Tensor:
            return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)
                              if f.metadata.get("ranks", "sum") == reduce])

        return part("sum"), part("max")

    @classmethod
    def read(cls, summed: list[float], largest: list[float]) -> "Figures":
        """The figures of :meth:`vectors` reduced over ranks and read back to the host."""
        named, parts = {}, {"sum": list(summed), "max": list(largest)}
        for f in fields(cls):
            values = parts[f.metadata.get("ranks", "sum")]
            n = len(MODALITY_NAMES) if f.name.startswith("modality_") else 1
            named[f.name] = np.asarray(values[:n]) if f.name.startswith("modality_") else values[0]
            del values[:n]
        return cls(**named)


@dataclass
class Scored:
    """What the model's logits give of one micro-batch, at its supervised positions (N of them)."""

    token_loss: torch.Tensor  # (N,) cross-entropy, float32
    supervised: torch.Tensor  # (B, L-1) where the N positions are
    aux_loss: torch.Tensor | None  # an MoE backbone's router loss
    lse: torch.Tensor | None  # (N,) logsumexp of the logits, float32 (with its gradient under z-loss)
    logit_max: torch.Tensor | None  # () the largest |logit|


class MioModule(L.LightningModule):
    """Causal-LM training over packed multimodal batches.

    Args:
        backbone: local model folder: a text-only LM (with ``extend_vocab``) or the previous
            stage's output.
        extend_vocab: add mio's 12,294 tokens (6 specials, 8192 image and 4096 speech codes) to a text-only backbone first.
        location_tokens: with ``extend_vocab``, also add box markers and location tokens after them
            (grounding; ``{scheme: bins, size: B}`` or ``{scheme: grid, size: P}``; default none).
        attn_backend: per-sample attention isolation: ``sdpa`` (4D mask), ``flex`` or ``flash``.
        lr, weight_decay, betas, warmup_ratio, min_lr_ratio: AdamW with cosine decay.
        output_dir: where the stage's ``save_pretrained`` folder goes
            (default ``<trainer.default_root_dir>/model``).
        gradient_checkpointing: recompute activations in the backward pass.
        lora: train LoRA adapters (and the added tokens' rows) on a frozen backbone; the stage
            then writes a PEFT adapter folder (default ``<trainer.default_root_dir>/adapter``).
        z_loss: weight of the z-loss, the mean of ``logsumexp(logits)^2`` over the loss's supervised
            positions (mio/train/loss.py); 0 (default) leaves the loss bitwise as without it.
        monitors: log ``train/grad_norm`` (before clipping), ``train/clipped_fraction``,
            ``train/logit_max`` and ``train/lse_mean`` (per modality too) at every log step.
        guard: which steps are kept out of the weights (mio/train/guard.py): non-finite ones by default.
        qk_norm: per-head RMSNorm of queries and keys (mio/model/qk_norm.py): a Llama or
            Mistral backbone becomes Qwen3's layout, its norms calibrated on the stage's first
            micro-batch; a family with it keeps it; any other is refused.
    """

    def __init__(self, backbone: str, extend_vocab: bool = False, attn_backend: str = "sdpa", lr: float = 3e-5,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.03,
                 min_lr_ratio: float = 0.1, output_dir: str | None = None, gradient_checkpointing: bool = False,
                 lora: LoraSettings | None = None, z_loss: float = 0.0, monitors: bool = True,
                 guard: GuardSettings | None = None, qk_norm: bool = False,
                 location_tokens: LocationTokens | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lora = lora
        self.location_tokens = LocationTokens.of(location_tokens)
        if z_loss < 0:
            raise MioUserError(f"model.z_loss is a weight, at least 0 (the pretraining stages use 1e-5), got {z_loss}")
        self.z_loss, self.monitors = z_loss, monitors
        self.guard_settings = guard if guard is not None else GuardSettings()
        self.guard: Guard | None = None  # made in setup (it writes into the stage folder)
        if qk_norm and lora is not None:
            raise MioUserError("model.qk_norm adds norm weights that a frozen LoRA backbone would not train: convert "
                             "in a full stage first (its output keeps QK-norm), then train adapters on it")
        self.data: DataLink | None = None  # what connect() got from the data module
        if lora is not None and extend_vocab:
            raise MioUserError("model.lora needs a backbone that already has mio's tokens (a previous stage's "
                             "output): an adapter cannot carry a resized embedding; drop model.extend_vocab")
        # The model's structure only, on the meta device: configure_model loads the weights (into
        # shards, under FSDP2), so no process holds a copy it does not need.
        try:
            self.model, self.tokenizer, self.table = self._build(weights=False)
        except VocabError as err:
            what = ("drop model.extend_vocab: this backbone has mio's tokens already (a stage's output)" if extend_vocab
                    else "a text-only backbone needs model.extend_vocab: true (as stage 1 has), or start from the "
                         "output folder of a stage that extended it")
            raise VocabError(f"model.backbone {backbone}: {err}; {what}") from err
        self.attn_backend = effective_backend(self.model, attn_backend)  # eager where a family has no SDPA
        self.aux_coefficient = router_aux_coefficient(self.model)  # MoE: the config's router loss weight
        self.flop_counts = FlopCounts.of(self.model)  # before any strategy shards the parameters
        self._peak_flops: float | None = None
        self.inherited_specs = load_tokenizer_specs(backbone) or {}
        self.output_path: Path | None = None
        self._t0 = 0.0
        self._window: Figures | None = None  # the figures since the last logged step
        self._micro = 0  # micro-batches of the current optimizer step done
        self._n_step = torch.ones(())  # supervised tokens of the current optimizer step, all ranks
        self._step_loss = torch.zeros((), dtype=torch.float64)  # this rank's loss sum of the current step
        self._step_keys: list[list[str]] = []  # the samples of this rank's rows of the current step
        self._norm: torch.Tensor | None = None  # the current step's gradient norm (a DTensor under FSDP2)
        self._skipping = False  # the current step is kept out of the weights
        self._rows = 1  # rows of the last micro-batch (what Lightning's logging counts as the batch size)

    def _build(self, weights: bool) -> tuple[Any, Any, VocabTable]:
        """The backbone as this stage trains it: extended, with LoRA adapters, checkpointed layers."""
        hp = self.hparams
        # Random initialisation (the added rows, LoRA adapters) draws from the start of the run's
        # seeded stream, whatever ran before: the same model under every strategy, and building
        # the skeleton leaves the stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed())
            implementation = hf_attn_implementation(hp.attn_backend)
            model, tokenizer, table = load_backbone(hp.backbone, extend=hp.extend_vocab, weights=weights,
                                                    attn_implementation=implementation,
                                                    locations=self.location_tokens)
            if hp.qk_norm and not has_qk_norm(model):
                check_convertible(model.config, hp.backbone)
                model = (with_qk_norm(model, self._calibration_batch(), implementation) if weights
                         else skeleton(model, implementation))
            if self.lora is not None:  # mio/model/lora.py: a frozen backbone, adapters and added-token rows train
                model = apply_lora(model, self.lora, table, hp.backbone)
        if hp.gradient_checkpointing:
            # Non-reentrant: gradients reach every parameter, as DDP and FSDP expect.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()  # from_pretrained returns the model in eval mode
        return model, tokenizer, table

    def _calibration_batch(self) -> dict[str, torch.Tensor]:
        if self.data is None:
            raise ValueError("model.qk_norm calibrates its norms on the stage's first micro-batch: connect the data "
                             "module first (MioModule.connect; mio fit does)")
        return self.data.first_batch()

    def configure_model(self) -> None:
        """Give the model its weights: under ``FSDP2Strategy`` shard it first, then global rank 0
        reads the weights and broadcasts them into every rank's shards; otherwise load them here."""
        if not any(p.is_meta for p in self.model.parameters()):
            return  # done before (a second fit of this module)
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard_and_load(self.model, lambda: self._build(weights=True)[0])
        elif isinstance(strategy, ModelParallelStrategy):
            raise MioUserError("mio shards the model itself: use strategy class_path mio.train.sharding.FSDP2Strategy "
                             "(stages/cluster/fsdp2_7b.yaml), not ModelParallelStrategy")
        else:
            self.load_weights()

    def load_weights(self) -> None:
        """Read the weights of the whole model into this process (unsharded training, tests)."""
        self.model = self._build(weights=True)[0]

    def cpu(self) -> "MioModule":
        # Lightning's teardown moves the module to the CPU, also after an error that came before
        # configure_model gave the skeleton its weights: nothing to move then, and the error stays.
        if any(p.is_meta for p in self.model.parameters()):
            return self
        return super().cpu()

    def connect(self, datamodule: MioDataModule, stage_dir: str | Path) -> None:
        """The one meeting of the model and its data, before fitting: the data module gets the
        model's tokenizer, vocabulary table and limits, and checks its data against them; the
        model gets what it needs of the data (:class:`mio.train.data.DataLink`)."""
        self.data = datamodule.connect(tokenizer=self.tokenizer, table=self.table,
                                       max_positions=getattr(self.model.config, "max_position_embeddings", None),
                                       pad_multiple=pad_multiple(self.attn_backend), specs=self.inherited_specs,
                                       stage_dir=stage_dir)

    def setup(self, stage: str) -> None:
        self.guard = Guard(self.guard_settings, self.trainer.default_root_dir, writer=self.trainer.is_global_zero)
        if self.trainer.is_global_zero:  # the trainable-parameter report (mio/model/lora.py)
            for line in parameter_report(self.model).lines():
                info(line)

    # --- training -----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], aux: bool = True) -> SupervisedOutput:
        """Packed batch -> the model's own logits (N, V) at the supervised positions (row-major; samples
        isolated by the backend) and, for an MoE backbone when ``aux``, its router load-balancing loss."""
        keep = supervised_positions(batch["labels"])  # (B, L)
        return supervised_logits(self.model, batch, keep, self.attn_backend, aux_loss=aux and self.aux_coefficient > 0)

    def token_losses(self, batch: dict[str, torch.Tensor], aux: bool = True, monitors: bool = False,
                     largest: bool = False) -> Scored:
        """The loss of every supervised token (N,) and where they are (B, L-1): what training and
        validation both average over tokens; when ``aux``, an MoE backbone's router loss; the
        logits' logsumexp (N,) under z-loss (with its gradient) or for ``monitors``; and, when
        ``largest``, their largest magnitude (a pass over the (N, V) logits)."""
        out = self(batch, aux)  # the model's own logits (N, V)
        targets = batch["labels"][:, 1:]  # (B, L-1): the token each position predicts
        supervised = targets != IGNORE_INDEX
        wanted = supervised_targets(batch["labels"])  # (N,)
        # One float32 copy of the (N, V) logits (the one the loss makes anyway): the loss and its
        # logsumexp share it, so their gradients add up in float32 before one cast back.
        logits = out.logits.float()
        token_loss = token_cross_entropy(logits, wanted)
        lse = logit_max = None
        if self.z_loss > 0 and torch.is_grad_enabled():
            lse = token_logsumexp(logits, wanted, token_loss)
        elif monitors:
            with torch.no_grad():
                lse = token_logsumexp(logits, wanted, token_loss)
        if largest and out.logits.shape[0]:  # a shape, known on the host
            logits = out.logits.detach()
            logit_max = torch.maximum(logits.amax(), logits.amin().neg())  # no |logits| copy
        return Scored(token_loss, supervised, out.aux_loss, lse, logit_max)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The largest |logit| costs a pass over the (N, V) logits: taken on the steps that are logged.
        scored = self.token_losses(batch, monitors=self.monitors, largest=self.monitors and self._logged_step())
        if self._micro == 0:  # the supervised tokens of the whole optimizer step, over all ranks
            self._n_step = step_tokens(batch["step_supervised"].to(self.device))
            self._step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            self._step_keys = []
        # Every supervised token of the optimizer step's global batch weighs the same (mio/train/loss.py).
        replicas = self.trainer.world_size * self.trainer.accumulate_grad_batches
        loss = micro_batch_loss(scored.token_loss, self._n_step, replicas)
        if self.z_loss > 0 and scored.lse is not None:  # normalized as the loss: a mean over the global batch
            loss = loss + self.z_loss * micro_batch_loss(scored.lse.square(), self._n_step, replicas)
        if scored.aux_loss is not None:
            # A mean over this micro-batch's real tokens: Lightning's and DDP's averaging is right for it.
            loss = loss + self.aux_coefficient * scored.aux_loss
        self._step_loss = self._step_loss + scored.token_loss.detach().sum()
        self._step_keys += batch.get("keys", [])
        self._account(scored, batch)
        return loss

    def _all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.trainer.world_size > 1:
            if op == "sum":
                x = self.trainer.strategy.reduce(x, reduce_op="sum")
            else:  # Lightning's reduce knows sum and mean only
                x = x.clone()
                torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return x

    def _account(self, scored: Scored, batch: dict[str, Any]) -> None:
        """Add the micro-batch's figures to the window (on the device, no sync; the data counts on the host)."""
        self._add(self._figures(scored, batch))
        if self.data is not None and "data" in batch:
            self.data.report.add(batch["data"])
        self._micro = (self._micro + 1) % self.trainer.accumulate_grad_batches
        self._rows = batch["input_ids"].shape[0]

    def _add(self, figures: Figures) -> None:
        self._window = figures if self._window is None else self._window + figures

    # --- the optimizer step: gradient norm, guard, clipping ------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the step's last backward, before clipping: the gradient norm, the guard's decision
        (a skipped step's gradients are set to None, so AdamW changes nothing), the step's figures;
        then, at a step Lightning logs, the window's."""
        guard = self.guard_settings.enabled and self.guard is not None
        self._norm, self._skipping = None, False
        if self.monitors or guard:
            self._norm = gradient_norm(self.model.parameters())
        if self._norm is not None:
            norm = self._norm.full_tensor() if isinstance(self._norm, DTensor) else self._norm
            step = Figures.zeros(self.device)
            clip = self.trainer.gradient_clip_val
            step.grad_norm_sum, step.steps = norm, torch.ones_like(norm)
            step.clipped = (norm > clip).to(torch.float64) if clip else torch.zeros_like(norm)
            self._add(step)
            if guard:
                self._judge(optimizer, norm)
        if self._logged_step():
            self._log_window(self._rows)

    def _logged_step(self) -> bool:
        """The optimizer step under way is one Lightning logs."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0

    def _judge(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> None:
        """The guard's decision, the same on every rank: taken from the step's loss and gradient
        norm summed over ranks in one reduction and read back (the guard's one host sync per step)."""
        assert self.guard is not None
        world = self.trainer.world_size
        count = self._n_step.to(device=self.device, dtype=torch.float64) / world  # the same on every rank
        loss_sum, norms, count = self._all_reduce(torch.stack([self._step_loss, norm, count])).tolist()
        loss, grad_norm = loss_sum / max(count, 1), norms / world
        reason = self.guard.judge(loss, grad_norm)
        if reason is None:
            self.guard.keep(loss)
            return
        self._skipping = True
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves a parameter without a gradient untouched
        keys = self._step_keys
        if world > 1:  # the rows of every rank, in rank order (a collective, on a skipped step only)
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, keys)
            keys = [row for part in gathered for row in part]
        step = self.trainer.global_step + 1
        if self.trainer.is_global_zero:
            info(f"step {step} skipped: {reason} (loss {loss:.4g}, gradient norm {grad_norm:.4g})")
        self.guard.skip(SkippedStep(step, reason, loss, grad_norm, keys))  # raises after too many in a row

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip with the norm the step computed already (a skipped step has no gradients to clip)."""
        if self._skipping:
            return
        if self._norm is None or gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_val:
            with_grads = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(with_grads, gradient_clip_val, self._norm.float())

    @torch.no_grad()
    def _figures(self, scored: Scored, batch: dict[str, torch.Tensor]) -> Figures:
        """This micro-batch's figures on this rank, on the device. No boolean indexing and no tensor
        made from a Python number: either would wait for the device."""
        token_loss, supervised, aux_loss = scored.token_loss.detach(), scored.supervised, scored.aux_loss
        modality = batch["modality"][:, 1:]  # (B, L-1) the modality of each target

        def placed(values: torch.Tensor) -> torch.Tensor:
            """(B, L-1): each supervised target's value in its place (row-major, the order of
            token_loss), 0 elsewhere."""
            grid = torch.zeros(supervised.shape, dtype=values.dtype, device=values.device)
            return grid.masked_scatter(supervised, values)

        losses = placed(token_loss)
        lse = scored.lse.detach() if scored.lse is not None else None
        lse_grid = placed(lse) if lse is not None else None
        real = batch["document_ids"] >= 0  # (B, L)
        n_supervised = supervised.sum()

        def number(v: float) -> torch.Tensor:
            return torch.full((), v, dtype=torch.float64, device=self.device)

        def per_modality(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values).to(torch.float64)

        targets = [(modality == mid) & supervised for mid in MODALITY_NAMES]  # (B, L-1) each
        zero = number(0.0)
        return Figures(
            loss_sum=token_loss.sum().to(torch.float64), supervised=n_supervised.to(torch.float64),
            real=real.sum().to(torch.float64), capacity=number(real.numel()),
            flops=self.flop_counts.step_flops(batch["seq_lens"], n_supervised).to(torch.float64),
            aux_loss=aux_loss.detach().to(torch.float64) if aux_loss is not None else zero,
            micro_batches=number(1.0),
            lse_sum=lse.sum().to(torch.float64) if lse is not None else zero,
            lse_square_sum=lse.square().sum().to(torch.float64) if lse is not None else zero,
            lse_count=n_supervised.to(torch.float64) if lse is not None else zero,
            modality_loss_sum=per_modality([torch.where(sel, losses, 0.0).sum() for sel in targets]),
            modality_supervised=per_modality([sel.sum() for sel in targets]),
            modality_real=per_modality([((batch["modality"] == mid) & real).sum() for mid in MODALITY_NAMES]),
            modality_lse_sum=(per_modality([torch.where(sel, lse_grid, 0.0).sum() for sel in targets])
                              if lse_grid is not None else torch.zeros(len(targets), dtype=torch.float64,
                                                                       device=self.device)),
            modality_lse_count=(per_modality([sel.sum() for sel in targets]) if lse is not None
                                else torch.zeros(len(targets), dtype=torch.float64, device=self.device)),
            logit_max=scored.logit_max.to(torch.float64) if scored.logit_max is not None else zero,
            grad_norm_sum=zero, clipped=zero, steps=zero)

    def _summed_window(self) -> tuple[Figures, list[float]]:
        """(the loop's figures, the data report's counts) since the last logged step, summed over
        ranks in one reduction: the one host sync of a logged step. A collective: every rank calls it."""
        report = self.data.report if self.data is not None else None
        host = torch.from_numpy(report.local_vector() if report is not None else np.zeros(0))
        summed, largest = (self._window if self._window is not None else Figures.zeros(self.device)).vectors()
        summed = self._all_reduce(torch.cat([summed, host.to(self.device, non_blocking=True)]))
        values = torch.cat([summed, self._all_reduce(largest, "max")]).tolist()
        self._window = None
        n = len(summed) - len(host)
        return Figures.read(values[:n], values[len(summed):]), values[n:len(summed)]

    def _log_window(self, rows: int) -> None:
        figures, data = self._summed_window()
        real = figures.real
        metrics = {"train/loss": figures.loss_sum / max(figures.supervised, 1),
                   "train/packing_efficiency": real / max(figures.capacity, 1)}
        if self.aux_coefficient > 0:  # the router loss, a mean over the window's micro-batches (and ranks)
            metrics["train/aux_loss"] = figures.aux_loss / max(figures.micro_batches, 1)
        for m, name in enumerate(MODALITY_NAMES.values()):
            count = figures.modality_supervised[m]
            # NaN when the window has none: a missing key would show the previous window's value.
            metrics[f"train/loss_{name}"] = figures.modality_loss_sum[m] / count if count > 0 else float("nan")
            metrics[f"train/modality_share_{name}"] = figures.modality_real[m] / max(real, 1)
        if self.z_loss > 0:  # the term the loss holds: the weight times the mean square logsumexp
            metrics["train/z_loss"] = self.z_loss * figures.lse_square_sum / max(figures.lse_count, 1)
        if self.monitors:
            metrics |= monitor_metrics(figures)
        if self.guard is not None and self.guard_settings.enabled:
            metrics["train/skipped_steps"] = float(self.guard.skipped)
        now = time.perf_counter()
        if self._t0:
            seconds = now - self._t0
            metrics["train/tokens_per_sec"] = real / seconds  # real tokens of all ranks
            achieved = figures.flops / seconds / self.trainer.world_size  # per device
            metrics["train/tflops_per_device"] = achieved / 1e12
            if self._peak_flops:
                metrics["train/mfu"] = achieved / self._peak_flops
        self._t0 = now
        if self.data is not None:
            metrics.update(self.data.report.log(data))  # stops the stage past data.max_error_fraction
        self.log_dict(metrics, prog_bar=False, batch_size=rows)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=1)
        if "train/tokens_per_sec" in metrics:
            self.log("tok/s", metrics["train/tokens_per_sec"], prog_bar=True, logger=False, batch_size=1)

    # --- validation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_figures: Figures | None = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scored = self.token_losses(batch, aux=False)  # validation reports no router loss
        figures = self._figures(scored, batch)  # this rank's
        self._val_figures = figures if self._val_figures is None else self._val_figures + figures

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and ``val/loss_<modality>``: sums over the pass's tokens on every rank,
        divided by their counts, as the training loss is."""
        if self._val_figures is None:
            return
        # summed over ranks, read once per pass
        summed, largest = self._val_figures.vectors()
        values = torch.cat([self._all_reduce(summed), self._all_reduce(largest, "max")]).tolist()
        figures = Figures.read(values[:len(summed)], values[len(summed):])
        metrics = {"val/loss": figures.loss_sum / figures.supervised if figures.supervised else float("nan")}
        for m, name in enumerate(MODALITY_NAMES.values()):
            count = figures.modality_supervised[m]
            metrics[f"val/loss_{name}"] = figures.modality_loss_sum[m] / count if count > 0 else float("nan")
        self.log_dict(metrics, prog_bar=False, batch_size=1)
        self.log("val_loss", metrics["val/loss"], prog_bar=True, logger=False, batch_size=1)

    def on_fit_start(self) -> None:
        # Before any batch is read: packed rows need a backbone whose samples the attention mask isolates.
        if self.data is None or self.data.pack:
            check_packing(self.model, self.attn_backend)

    def on_train_start(self) -> None:
        self._peak_flops = peak_flops(self.device, str(self.trainer.precision))

    def on_train_end(self) -> None:
        # The closing data summary and report, with the steps since the last logged one.
        _, data = self._summed_window()
        if self.data is not None and self.trainer.is_global_zero:
            self.data.report.close(data)

    # --- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters", {}))
        checkpoint["mio_vocab"] = self.table.to_dict()
        # Every rank's random state (dropout, sampling): called on all ranks, written by rank 0.
        states = [rng_state()]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint["mio_rng"] = states
        if self.guard is not None:  # the spike median's history and the skip count go on
            checkpoint["mio_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("mio_vocab")
        if saved is not None and saved != self.table.to_dict():
            raise MioUserError(f"the checkpoint was trained with another vocabulary table than the backbone "
                             f"{self.hparams.backbone}'s: resume with the backbone the checkpoint's run started from")
        states = checkpoint.get("mio_rng") or []
        if len(states) == self.trainer.world_size:  # else (another world size) the seeds of this run stay
            set_rng_state(states[self.trainer.global_rank])
        if self.guard is not None and "mio_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["mio_guard"])

    # --- optimizer ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=hp.betas)
        steps = self.trainer.max_steps
        if steps is None or steps <= 0:
            raise MioUserError("trainer.max_steps must be set: a stage is a fixed number of optimizer steps")
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=math.ceil(hp.warmup_ratio * steps), num_training_steps=steps,
            min_lr_rate=hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- output -------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        folder = "adapter" if self.hparams.lora is not None else "model"  # LoRA: a PEFT adapter folder
        out = Path(self.hparams.output_dir or Path(self.trainer.default_root_dir) / folder)
        self.output_path = out
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        # Under FSDP2 the full weights are gathered on rank 0 (a collective); otherwise the model has them.
        state = full_state_dict(self.model) if isinstance(self.trainer.strategy, FSDP2Strategy) else None
        if not self.trainer.is_global_zero:
            return
        specs = self.data.specs if self.data is not None else self.inherited_specs
        # A stage never writes a folder the next one would start from broken.
        check_finite_weights(state if state is not None else self.model.state_dict(), out)
        save_model_folder(self.model, self.tokenizer, self.table, out, tokenizer_specs=specs, state_dict=state)
        if self.data is not None:  # the stage output records what it was trained on, and what was lost
            self.data.report.write(out)
        config = Path(log_dir or self.trainer.default_root_dir) / "config.yaml"
        if config.is_file():
            (out / "mio_stage_config.yaml").write_text(config.read_text())



def gradient_norm(parameters: Any) -> torch.Tensor | None:
    """The 2-norm of all gradients together, before clipping, in float64 (a DTensor under FSDP2,
    reduced over the shards when read); None without gradients.

    Each gradient is first reduced row by row (a row: its slice along dim 0, the dim FSDP2
    shards), and the row norms are summed in float64. torch's CPU kernel sums a float32 tensor's
    squares in one float32 accumulator (pytorch/pytorch#169237): 1% off for a 32000 x 4096
    gradient, 2e-4 off for the tiny model's output layer, and off by a different amount for each
    shard layout, so 1 process and 2 would disagree. A row is short, so its norm is exact to
    float32's precision; no float64 copy of a gradient is made."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm([row_norms(g) for g in grads]) if grads else None


def row_norms(grad: torch.Tensor) -> torch.Tensor:
    """(grad.shape[0],) float64: the 2-norm of each slice along dim 0 (a 0- or 1-D gradient: its
    elements), sharded as ``grad`` is."""
    if grad.ndim < 2:
        return grad.to(torch.float64)
    return torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.ndim))).to(torch.float64)


def monitor_metrics(figures: Figures) -> dict[str, float]:
    """The instability monitors of a window: the gradient norm before clipping (mean over its
    steps), the share of steps clipped, the mean logsumexp (per target modality too) and the
    largest |logit| of the logged step: logits drifting up show in the last two long before bf16
    overflows."""
    steps = max(figures.steps, 1)
    metrics = {"train/grad_norm": figures.grad_norm_sum / steps if figures.steps else float("nan"),
               "train/clipped_fraction": figures.clipped / steps, "train/logit_max": figures.logit_max,
               "train/lse_mean": figures.lse_sum / figures.lse_count if figures.lse_count else float("nan")}
    for m, name in enumerate(MODALITY_NAMES.values()):
        count = figures.modality_lse_count[m]
        metrics[f"train/lse_mean_{name}"] = figures.modality_lse_sum[m] / count if count > 0 else float("nan")
    return metrics
