"""The one LightningModule of every stage: what trains is a setting, not a script."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mio.model.attention import effective_backend, hf_attn_implementation
from mio.model.backbone import load_backbone, load_tokenizer_specs, save_model_folder
from mio.model.forward import (SupervisedOutput, check_packing, router_aux_coefficient, supervised_logits,
                               supervised_positions)
from mio.model.lora import LoraSettings, apply_lora, parameter_report
from mio.train.checkpoint import plain, rng_state, set_rng_state
from mio.train.data import DataReport
from mio.train.flops import FlopCounts, peak_flops
from mio.train.loss import micro_batch_loss, step_tokens, supervised_targets, token_cross_entropy
from mio.train.sharding import FSDP2Strategy, full_state_dict
from mio.vocab import MODALITY_NAMES, LocationTokens, VocabError, VocabTable

# The training loop's own figures, per rank and summed over the micro-batches since the last
# logged step: a vector with these entries, then (loss sum, supervised targets, real tokens) for
# each modality of MODALITY_NAMES. A logged step sums it over ranks (with the data report's
# counts) in one reduction and reads it back in one host sync.
STATS = ("loss_sum", "supervised", "real", "capacity", "flops", "aux_loss", "micro_batches")


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
    """

    def __init__(self, backbone: str, extend_vocab: bool = False, attn_backend: str = "sdpa", lr: float = 3e-5,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.03,
                 min_lr_ratio: float = 0.1, output_dir: str | None = None, gradient_checkpointing: bool = False,
                 lora: LoraSettings | None = None, location_tokens: LocationTokens | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lora = lora
        self.location_tokens = LocationTokens.of(location_tokens)
        if lora is not None and extend_vocab:
            raise ValueError("model.lora needs a backbone that already has mio's tokens (a previous stage's "
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
        self._window: torch.Tensor | None = None  # (K,) the STATS since the last logged step
        self._micro = 0  # micro-batches of the current optimizer step done
        self._n_step = torch.ones(())  # supervised tokens of the current optimizer step, all ranks

    def _build(self, weights: bool) -> tuple[Any, Any, VocabTable]:
        """The backbone as this stage trains it: extended, with LoRA adapters, checkpointed layers."""
        hp = self.hparams
        # Random initialisation (the added rows, LoRA adapters) draws from the start of the run's
        # seeded stream, whatever ran before: the same model under every strategy, and building
        # the skeleton leaves the stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed())
            model, tokenizer, table = load_backbone(hp.backbone, extend=hp.extend_vocab, weights=weights,
                                                    attn_implementation=hf_attn_implementation(hp.attn_backend),
                                                    locations=self.location_tokens)
            if self.lora is not None:  # mio/model/lora.py: a frozen backbone, adapters and added-token rows train
                model = apply_lora(model, self.lora, table, hp.backbone)
        if hp.gradient_checkpointing:
            # Non-reentrant: gradients reach every parameter, as DDP and FSDP expect.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()  # from_pretrained returns the model in eval mode
        return model, tokenizer, table

    def configure_model(self) -> None:
        """Give the model its weights: under ``FSDP2Strategy`` shard it first, then global rank 0
        reads the weights and broadcasts them into every rank's shards; otherwise load them here."""
        if not any(p.is_meta for p in self.model.parameters()):
            return  # done before (a second fit of this module)
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard_and_load(self.model, lambda: self._build(weights=True)[0])
        elif isinstance(strategy, ModelParallelStrategy):
            raise ValueError("mio shards the model itself: use strategy class_path mio.train.sharding.FSDP2Strategy "
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

    def setup(self, stage: str) -> None:
        if self.trainer.is_global_zero:  # the trainable-parameter report (mio/model/lora.py)
            for line in parameter_report(self.model).lines():
                print(f"[mio] {line}", file=sys.stderr, flush=True)

    # --- training -----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], aux: bool = True) -> SupervisedOutput:
        """Packed batch -> the model's own logits (N, V) at the supervised positions (row-major; samples
        isolated by the backend) and, for an MoE backbone when ``aux``, its router load-balancing loss."""
        keep = supervised_positions(batch["labels"])  # (B, L)
        return supervised_logits(self.model, batch, keep, self.attn_backend, aux_loss=aux and self.aux_coefficient > 0)

    def token_losses(self, batch: dict[str, torch.Tensor],
                     aux: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The loss of every supervised token (N,) and where they are (B, L-1): what training and
        validation both average over tokens; and, when ``aux``, an MoE backbone's router loss (else None)."""
        out = self(batch, aux)  # the model's own logits (N, V)
        targets = batch["labels"][:, 1:]  # (B, L-1): the token each position predicts
        supervised = targets != -100
        return token_cross_entropy(out.logits, supervised_targets(batch["labels"])), supervised, out.aux_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        token_loss, supervised, aux_loss = self.token_losses(batch)  # (N,), (B, L-1), () or None
        if self._micro == 0:  # the supervised tokens of the whole optimizer step, over all ranks
            self._n_step = step_tokens(batch["step_supervised"].to(self.device))
        # Every supervised token of the optimizer step's global batch weighs the same (mio/train/loss.py).
        replicas = self.trainer.world_size * self.trainer.accumulate_grad_batches
        loss = micro_batch_loss(token_loss, self._n_step, replicas)
        if aux_loss is not None:
            # A mean over this micro-batch's real tokens: Lightning's and DDP's averaging is right for it.
            loss = loss + self.aux_coefficient * aux_loss
        self._account(token_loss.detach(), batch, supervised, aux_loss)
        return loss

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            x = self.trainer.strategy.reduce(x, reduce_op="sum")
        return x

    def _data_report(self) -> DataReport | None:
        return getattr(getattr(self.trainer, "datamodule", None), "report", None)

    def _account(self, token_loss: torch.Tensor, batch: dict[str, Any], supervised: torch.Tensor,
                 aux_loss: torch.Tensor | None) -> None:
        """Add the micro-batch's figures to the window (on the device, no sync; the data counts on
        the host); after the last micro-batch of a step that Lightning logs, log the window."""
        stats = self._step_stats(token_loss, batch, supervised, aux_loss)
        self._window = stats if self._window is None else self._window + stats
        report = self._data_report()
        if report is not None and "data" in batch:
            report.add(batch["data"])
        self._micro = (self._micro + 1) % self.trainer.accumulate_grad_batches
        every = self.trainer.log_every_n_steps
        if self._micro == 0 and every > 0 and (self.trainer.global_step + 1) % every == 0:
            self._log_window(batch["input_ids"].shape[0])

    @torch.no_grad()
    def _step_stats(self, token_loss: torch.Tensor, batch: dict[str, torch.Tensor], supervised: torch.Tensor,
                    aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        """The figures of STATS for this micro-batch on this rank: (K,) float64, on the device. No
        boolean indexing and no tensor made from a Python number: either would wait for the device."""
        modality = batch["modality"][:, 1:]  # (B, L-1) the modality of each target
        # (B, L-1): each supervised target's loss in its place (row-major, the order of token_loss), 0 elsewhere
        placed = torch.zeros(supervised.shape, dtype=token_loss.dtype, device=token_loss.device)
        placed = placed.masked_scatter(supervised, token_loss)
        real = batch["document_ids"] >= 0  # (B, L)
        n_supervised = supervised.sum()
        flops = self.flop_counts.step_flops(batch["seq_lens"], n_supervised)

        def number(v: float) -> torch.Tensor:
            return torch.full((), v, dtype=torch.float64, device=self.device)

        values = [token_loss.sum(), n_supervised, real.sum(), number(real.numel()), flops,
                  aux_loss.detach() if aux_loss is not None else number(0.0), number(1.0)]
        for mid in MODALITY_NAMES:
            sel = (modality == mid) & supervised
            values += [torch.where(sel, placed, 0.0).sum(), sel.sum(), ((batch["modality"] == mid) & real).sum()]
        return torch.stack([v.to(torch.float64) for v in values])

    def _summed_window(self) -> tuple[list[float], list[float]]:
        """(the loop's figures, the data report's counts) since the last logged step, summed over
        ranks in one reduction: the one host sync of a logged step. A collective: every rank calls it."""
        report = self._data_report()
        host = torch.from_numpy(report.local_vector() if report is not None else np.zeros(0))
        window = self._window if self._window is not None else torch.zeros(len(STATS) + 3 * len(MODALITY_NAMES),
                                                                            dtype=torch.float64, device=self.device)
        values = self._all_reduce(torch.cat([window, host.to(self.device, non_blocking=True)])).tolist()
        self._window = None
        return values[:len(window)], values[len(window):]

    def _log_window(self, rows: int) -> None:
        stats, data = self._summed_window()
        figures = dict(zip(STATS, stats[:len(STATS)]))
        real = figures["real"]
        metrics = {"train/loss": figures["loss_sum"] / max(figures["supervised"], 1),
                   "train/packing_efficiency": real / max(figures["capacity"], 1)}
        if self.aux_coefficient > 0:  # the router loss, a mean over the window's micro-batches (and ranks)
            metrics["train/aux_loss"] = figures["aux_loss"] / max(figures["micro_batches"], 1)
        per_modality = np.asarray(stats[len(STATS):]).reshape(-1, 3)  # (modalities, 3)
        for name, (loss_sum, count, tokens) in zip(MODALITY_NAMES.values(), per_modality):
            # NaN when the window has none: a missing key would show the previous window's value.
            metrics[f"train/loss_{name}"] = loss_sum / count if count > 0 else float("nan")
            metrics[f"train/modality_share_{name}"] = tokens / max(real, 1)
        now = time.perf_counter()
        if self._t0:
            seconds = now - self._t0
            metrics["train/tokens_per_sec"] = real / seconds  # real tokens of all ranks
            achieved = figures["flops"] / seconds / self.trainer.world_size  # per device
            metrics["train/tflops_per_device"] = achieved / 1e12
            if self._peak_flops:
                metrics["train/mfu"] = achieved / self._peak_flops
        self._t0 = now
        report = self._data_report()
        if report is not None:
            metrics.update(report.log(data))  # stops the stage past data.max_error_fraction
        self.log_dict(metrics, prog_bar=False, batch_size=rows)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=1)
        if "train/tokens_per_sec" in metrics:
            self.log("tok/s", metrics["train/tokens_per_sec"], prog_bar=True, logger=False, batch_size=1)

    # --- validation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_stats: torch.Tensor | None = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        token_loss, supervised, _ = self.token_losses(batch, aux=False)  # validation reports no router loss
        stats = self._step_stats(token_loss, batch, supervised)  # (K,) this rank's
        self._val_stats = stats if self._val_stats is None else self._val_stats + stats

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and ``val/loss_<modality>``: sums over the pass's tokens on every rank,
        divided by their counts, as the training loss is."""
        if self._val_stats is None:
            return
        values = self._all_reduce(self._val_stats).tolist()  # summed over ranks, read once per pass
        figures = dict(zip(STATS, values[:len(STATS)]))
        metrics = {"val/loss": figures["loss_sum"] / figures["supervised"] if figures["supervised"] else float("nan")}
        for name, (loss_sum, count, _) in zip(MODALITY_NAMES.values(), np.reshape(values[len(STATS):], (-1, 3))):
            metrics[f"val/loss_{name}"] = loss_sum / count if count > 0 else float("nan")
        self.log_dict(metrics, prog_bar=False, batch_size=1)
        self.log("val_loss", metrics["val/loss"], prog_bar=True, logger=False, batch_size=1)

    def on_fit_start(self) -> None:
        # Before any batch is read: packed rows need a backbone whose samples the attention mask isolates.
        if getattr(self.trainer.datamodule, "pack", True):
            check_packing(self.model, self.attn_backend)

    def on_train_start(self) -> None:
        self._peak_flops = peak_flops(self.device, str(self.trainer.precision))

    def on_train_end(self) -> None:
        # The closing data summary and report, with the steps since the last logged one.
        _, data = self._summed_window()
        report = self._data_report()
        if report is not None and self.trainer.is_global_zero:
            report.close(data)

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("mio_vocab")
        if saved is not None and saved != self.table.to_dict():
            raise ValueError(f"the checkpoint was trained with another vocabulary table than the backbone "
                             f"{self.hparams.backbone}'s: resume with the backbone the checkpoint's run started from")
        states = checkpoint.get("mio_rng") or []
        if len(states) == self.trainer.world_size:  # else (another world size) the seeds of this run stay
            set_rng_state(states[self.trainer.global_rank])

    # --- optimizer ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=hp.betas)
        steps = self.trainer.max_steps
        if steps is None or steps <= 0:
            raise ValueError("trainer.max_steps must be set: a stage is a fixed number of optimizer steps")
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
        specs = dict(self.inherited_specs)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            for kind, spec in datamodule.tokenizer_specs().items():
                if kind in specs and specs[kind].get("sha256") != spec.get("sha256"):
                    raise ValueError(f"the {kind} tokenizer of this stage's data ({spec['path']}) differs from the "
                                     f"one the backbone was trained with ({specs[kind]['path']})")
                specs[kind] = _embed_spec(spec)
        save_model_folder(self.model, self.tokenizer, self.table, out, tokenizer_specs=specs, state_dict=state)
        report = self._data_report()
        if report is not None:  # the stage output records what it was trained on, and what was lost
            report.write(out)
        config = Path(log_dir or self.trainer.default_root_dir) / "config.yaml"
        if config.is_file():
            (out / "mio_stage_config.yaml").write_text(config.read_text())


def _embed_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Keep the spec's content beside its path, so a model folder decodes on another machine."""
    if "content" in spec:
        return spec
    import yaml

    return {**spec, "content": yaml.safe_load(Path(spec["path"]).read_text())}
