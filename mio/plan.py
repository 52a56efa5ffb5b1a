"""`mio plan`: the memory a stage needs per GPU, on paper, before renting the GPUs.

The stage's model is built on the meta device from its backbone's ``config.json`` alone (no
weights, no memory): extended by mio's tokens when the stage extends it (``config.vocab_size`` +
12,294 rows), with LoRA adapters when it has them. Its parameters are counted and the closed-form
per-GPU memory printed for N GPUs (P parameters, T of them trainable; mixed precision: float32
master weights, gradients and AdamW states, bfloat16 compute):

    DDP          parameters 4P, gradients 4T, optimizer states 8T       (every GPU holds all)
    FSDP2        the same / S, S = N (full) or the GPUs of a node (hybrid),
                 plus the working set: 2 bfloat16 copies of the largest unit (decoder layer,
                 decoder rest or output layer) gathered at once (one computing, one prefetched)

Activations, bfloat16, per sample token (s tokens per pack, b packs per micro-batch; L layers,
width h, key/value width k, MLP width i; FlashAttention keeps no s x s scores) -- what a Llama
block saves for its backward pass: the two norms' inputs and outputs (4h), the attention's
q, k, v and output (2h + 2k), the MLP's gate, up, SiLU(gate) and product (4i):

    without checkpointing   L x 2(6h + 2k + 4i) bytes
    with checkpointing      L x 2h (each layer's input) + 2(6h + 2k + 4i) (one layer recomputed)

plus the output layer's logits where supervised (at most every token): V x (2 + 4) bytes
(bfloat16, then float32 for the loss). Not counted: the CUDA context and allocator slack (~1-3 GB
per GPU), DDP's gradient buckets, temporary buffers of the kernels.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mio.model.lora import LoraSettings, apply_lora
from mio.train.sharding import decoder_layers
from mio.userio import MioUserError, load_yaml_mapping, run_command
from mio.vocab import VocabTable

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What a stage's memory depends on, counted from its model on the meta device."""

    parameters: int  # P, tied ones once
    trainable: int  # T
    largest_unit: int  # parameters of the largest FSDP2 unit
    layers: int
    hidden: int
    kv_width: int  # key/value heads x head dim
    intermediate: int
    vocab: int  # rows of the output layer

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        config = model.config.get_text_config()
        blocks = decoder_layers(model)
        unique = {id(p): p for p in model.parameters()}.values()
        decoder = {id(p): p for p in model.get_decoder().parameters()}
        in_layers = {id(p) for p in blocks.parameters()}
        output = model.get_output_embeddings()
        head = sum(p.numel() for p in {id(p): p for p in output.parameters()}.values() if id(p) not in decoder)
        rest = sum(p.numel() for i, p in decoder.items() if i not in in_layers)  # embedding, final norm
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(parameters=sum(p.numel() for p in unique),
                   trainable=sum(p.numel() for p in unique if p.requires_grad),
                   largest_unit=max(sum(p.numel() for p in blocks[0].parameters()), rest, head),
                   layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), kv_width=kv_heads * head_dim,
                   intermediate=int(config.intermediate_size), vocab=int(output.weight.shape[0]))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    parameters: float
    gradients: float
    optimizer: float
    working_set: float = 0.0  # FSDP2: gathered units

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.working_set


def ddp_memory(shape: ModelShape) -> Memory:
    return Memory(parameters=4.0 * shape.parameters, gradients=4.0 * shape.trainable, optimizer=8.0 * shape.trainable)


def fsdp2_memory(shape: ModelShape, shards: int) -> Memory:
    full = ddp_memory(shape)
    return Memory(parameters=full.parameters / shards, gradients=full.gradients / shards,
                  optimizer=full.optimizer / shards, working_set=2 * 2.0 * shape.largest_unit)


def activation_memory(shape: ModelShape, context: int, micro_batch: int, checkpointing: bool) -> float:
    """Bytes of activations per GPU for one micro-batch (see the module's docstring)."""
    tokens = context * micro_batch
    layer = 2.0 * (6 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate) * tokens
    kept = shape.layers * 2.0 * shape.hidden * tokens + layer if checkpointing else shape.layers * layer
    return kept + 6.0 * shape.vocab * tokens


def stage_model(backbone: str | Path, extend_vocab: bool, lora: LoraSettings | None) -> nn.Module:
    """The stage's model on the meta device, from ``<backbone>/config.json`` alone."""
    config = AutoConfig.from_pretrained(backbone, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        rows = model.get_input_embeddings().weight.shape[0]
        if extend_vocab:
            table = VocabTable.mio_default(rows)
            model.resize_token_embeddings(table.total_size, mean_resizing=False)
        else:  # extended before: the last 12,294 rows are mio's
            table = VocabTable.mio_default(rows - VocabTable.mio_default(0).num_added)
        if lora is not None:
            model = apply_lora(model, lora, table, backbone)
    return model


def read_stage(configs: list[Path]) -> dict[str, Any]:
    """The settings of a stage's YAML files (later files override earlier ones, key by key)."""
    merged: dict[str, Any] = {}
    for path in configs:
        _merge(merged, load_yaml_mapping(path, "stage config"))
    return merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def plan(shape: ModelShape, gpus: int, gpus_per_node: int, context: int, micro_batch: int) -> dict[str, Any]:
    """Per-GPU gigabytes at ``gpus`` GPUs: DDP, FSDP2 over all GPUs, FSDP2 hybrid (within a node)."""
    rows: dict[str, Any] = {"gpus": gpus}
    strategies = {"ddp": ddp_memory(shape), "fsdp2": fsdp2_memory(shape, gpus)}
    if gpus > gpus_per_node:
        strategies["fsdp2_hybrid"] = fsdp2_memory(shape, gpus_per_node)
    for name, memory in strategies.items():
        rows[name] = {k: round(v / GB, 2) for k, v in {**asdict(memory), "total": memory.total}.items()}
    rows["activations"] = {
        f"{'with' if ckpt else 'without'}_checkpointing": round(activation_memory(shape, context, micro_batch, ckpt) / GB, 2)
        for ckpt in (False, True)}
    return rows


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mio plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="the stage's YAML (and overlays); model.*, data.context_length and data.batch_size are read")
    p.add_argument("--backbone", type=Path, default=None,
                   help="a folder with the backbone's config.json (default: the stage's model.backbone)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 32], help="GPU counts to plan for (default: 8 32)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for hybrid sharding (default: 8)")
    p.add_argument("--context", type=int, default=None, help="tokens per pack (default: the stage's, else 2800)")
    p.add_argument("--micro-batch", type=int, default=None, help="packs per GPU (default: the stage's, else 4)")
    args = p.parse_args(argv)
    return run_command(lambda: _print_plan(args))


def _print_plan(args: argparse.Namespace) -> int:
    shape, rows, context, micro_batch = _plan_stage(args)
    print(render(shape, rows, context, micro_batch))
    print(json.dumps({"shape": asdict(shape), "context": context, "micro_batch": micro_batch, "plans": rows}))
    return 0


def _plan_stage(args: argparse.Namespace) -> tuple[ModelShape, list[dict[str, Any]], int, int]:
    stage = read_stage(args.config)
    model_cfg, data_cfg = stage.get("model") or {}, stage.get("data") or {}
    backbone = args.backbone or model_cfg.get("backbone")
    if backbone is None or not (Path(backbone) / "config.json").is_file():
        raise FileNotFoundError(f"{backbone}: no config.json; give --backbone a folder with the backbone's config.json")
    lora = LoraSettings(**model_cfg["lora"]) if model_cfg.get("lora") else None
    context = args.context or int(data_cfg.get("context_length", 2800))
    micro_batch = args.micro_batch or int(data_cfg.get("batch_size", 4))
    for name, value in (("gpus", min(args.gpus)), ("gpus-per-node", args.gpus_per_node), ("context", context),
                        ("micro-batch", micro_batch)):
        if value < 1:
            raise MioUserError(f"--{name} must be at least 1, got {value}")
    shape = ModelShape.of(stage_model(backbone, bool(model_cfg.get("extend_vocab")), lora))
    return shape, [plan(shape, g, args.gpus_per_node, context, micro_batch) for g in args.gpus], context, micro_batch


def render(shape: ModelShape, rows: list[dict[str, Any]], context: int, micro_batch: int) -> str:
    lines = [f"{shape.parameters / 1e9:.2f}B parameters ({shape.trainable / 1e9:.2f}B trainable), "
             f"{shape.layers} layers, vocabulary {shape.vocab}; GB per GPU:",
             f"{'GPUs':>5}  {'strategy':<13}{'params':>8}{'grads':>8}{'AdamW':>8}{'gathered':>10}{'total':>8}"]
    for row in rows:
        for name in ("ddp", "fsdp2", "fsdp2_hybrid"):
            if name in row:
                m = row[name]
                lines.append(f"{row['gpus']:>5}  {name:<13}{m['parameters']:>8.2f}{m['gradients']:>8.2f}"
                             f"{m['optimizer']:>8.2f}{m['working_set']:>10.2f}{m['total']:>8.2f}")
    act = rows[0]["activations"]
    lines.append(f"activations at context {context} x micro-batch {micro_batch}: "
                 f"{act['without_checkpointing']:.2f} GB, {act['with_checkpointing']:.2f} GB with checkpointing "
                 f"(model.gradient_checkpointing)")
    return "\n".join(lines)
