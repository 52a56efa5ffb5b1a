"""The one LightningModule of every stage: what trains is a setting, not a script."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mio.model.attention import hf_attn_implementation, packed_attention_kwargs
from mio.model.backbone import load_backbone, load_tokenizer_specs, save_model_folder
from mio.model.lora import LoraSettings, apply_lora, check_strategy, parameter_report
from mio.vocab import MODALITY_NAMES


class MioModule(L.LightningModule):
    """Causal-LM training over packed multimodal batches.

    Args:
        backbone: local model folder: a text-only LM (with ``extend_vocab``) or the previous
            stage's output.
        extend_vocab: add mio's 12,292 tokens to a text-only backbone first.
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
                 lora: LoraSettings | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.attn_backend = attn_backend
        self.model, self.tokenizer, self.table = load_backbone(
            backbone, attn_implementation=hf_attn_implementation(attn_backend), extend=extend_vocab)
        # --- LoRA (mio/model/lora.py): a frozen backbone, adapters and added-token rows train ---
        if lora is not None:
            if extend_vocab:
                raise ValueError("model.lora needs a backbone that already has mio's tokens (a previous stage's "
                                 "output): an adapter cannot carry a resized embedding; drop model.extend_vocab")
            self.model = apply_lora(self.model, lora, self.table, backbone)
        # --- end LoRA ---
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.config.use_cache = False
        self.model.train()  # from_pretrained returns the model in eval mode
        self.inherited_specs = load_tokenizer_specs(backbone) or {}
        self.output_path: Path | None = None
        self._t0 = 0.0

    def setup(self, stage: str) -> None:
        # --- LoRA (mio/model/lora.py): FSDP wrap check, trainable-parameter report ---
        check_strategy(self, self.trainer.strategy)
        if self.trainer.is_global_zero:
            for line in parameter_report(self.model).lines():
                print(f"[mio] {line}", file=sys.stderr, flush=True)
        # --- end LoRA ---

    # --- training -----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Packed batch -> final hidden states (B, L, D), samples isolated by the backend."""
        kwargs = packed_attention_kwargs(self.attn_backend, batch)
        kwargs.setdefault("position_ids", batch["position_ids"])
        return self.model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self(batch)  # (B, L, D)
        targets = batch["labels"][:, 1:]  # (B, L-1): the token each position predicts
        supervised = targets != -100
        # The output layer runs on supervised positions only: the (B, L, V) logits of a
        # 76k-token vocabulary are most of a step's memory, and SFT supervises few tokens.
        logits = self.model.get_output_embeddings()(hidden[:, :-1][supervised])  # (N, V)
        token_loss = torch.nn.functional.cross_entropy(logits.float(), targets[supervised], reduction="none")  # (N,)
        n_global = self._all_reduce(supervised.sum().float())
        # Sum over the rank's tokens / global count; DDP averages gradients over ranks, so
        # scale by the world size to get the mean over the global batch.
        loss = token_loss.sum() / n_global.clamp(min=1) * self.trainer.world_size
        self._log_step(token_loss.detach(), batch, supervised, n_global)
        return loss

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            x = self.trainer.strategy.reduce(x, reduce_op="sum")
        return x

    @torch.no_grad()
    def _log_step(self, token_loss: torch.Tensor, batch: dict[str, torch.Tensor], supervised: torch.Tensor,
                  n_global: torch.Tensor) -> None:
        modality = batch["modality"][:, 1:][supervised]  # (N,) modality of each supervised target
        metrics = {"train/loss": self._all_reduce(token_loss.sum()) / n_global.clamp(min=1)}
        for mid, name in MODALITY_NAMES.items():
            sel = modality == mid
            count = self._all_reduce(sel.sum().float())
            if count > 0:
                metrics[f"train/loss_{name}"] = self._all_reduce(token_loss[sel].sum()) / count
        real = batch["document_ids"] >= 0
        n_real = real.sum().float()
        metrics["train/packing_efficiency"] = n_real / real.numel()
        for mid, name in MODALITY_NAMES.items():
            metrics[f"train/share_{name}"] = ((batch["modality"] == mid) & real).sum() / n_real.clamp(min=1)
        now = time.perf_counter()
        if self._t0:
            metrics["train/tokens_per_sec"] = torch.tensor(n_real.item() * self.trainer.world_size / (now - self._t0))
        self._t0 = now
        self.log_dict(metrics, prog_bar=False, batch_size=batch["input_ids"].shape[0])
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=1)
        if "train/tokens_per_sec" in metrics:
            self.log("tok/s", metrics["train/tokens_per_sec"], prog_bar=True, logger=False, batch_size=1)

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
        save_model_folder(self.model, self.tokenizer, self.table, out, tokenizer_specs=specs)
        config = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "config.yaml"
        if config.is_file():
            (out / "mio_stage_config.yaml").write_text(config.read_text())


def _embed_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Keep the spec's content beside its path, so a model folder decodes on another machine."""
    if "content" in spec:
        return spec
    import yaml

    return {**spec, "content": yaml.safe_load(Path(spec["path"]).read_text())}
