"""Sharded training: FSDP2 (torch's ``fully_shard``) driven by Lightning's ``ModelParallelStrategy``.

Every parameter is a ``DTensor`` sharded along its first dimension over the data-parallel ranks;
gradients and AdamW states are sharded the same way. Each decoder layer is one ``fully_shard``
unit (found from the model: the blocks of its decoder, never named in YAML), so a step holds at
most one layer's full parameters at a time besides the sharded rest. With an untied output layer,
the decoder (embedding, final norm) and the output layer are units of their own, so a training
step may call them directly (``model.get_decoder()(...)``, ``model.get_output_embeddings()(...)``)
as well as through the model's forward; a tied one shares the embedding's weight, so both stay in
the root's unit, which only the model's own forward gathers.

Loading (:meth:`FSDP2Strategy.shard_and_load`): every rank builds the model on the meta device,
shards it and allocates only its shards; global rank 0 alone reads the weights (and draws the
rows of added tokens, the LoRA initialisation) and broadcasts them tensor by tensor with
``set_model_state_dict(..., broadcast_from_rank0=True)``. So no rank but rank 0 ever holds a whole
copy of the backbone, and everything random is drawn once and is the same on every rank by
construction.

Saving: checkpoints are ``torch.distributed.checkpoint`` folders (each rank writes its shards,
resharded on load to any number of ranks: see mio/train/checkpoint.py); the stage's output
folder is gathered to full weights on rank 0 with ``get_model_state_dict(..., full_state_dict=True,
cpu_offload=True)``.

Considered: transformers' own FSDP2 loading (``from_pretrained(distributed_config=...)``) shards
at load time, but mio extends the vocabulary and adds LoRA adapters between loading and
sharding, which a sharded model cannot take.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mio.dtypes import dtype_named
from mio.log import info
from mio.process_memory import peak_rss_mb, reset_peak_rss, rss_mb
from mio.userio import MioUserError


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with mio's FSDP2 sharding (``MioModule.configure_model``
    calls :meth:`shard_and_load`). Checkpoints are distributed (one folder, each rank its
    shards) and load on any number of ranks.

    Args:
        hybrid: shard inside a node and replicate across nodes (HSDP: parameters are gathered over
            the fast links within a node; only the gradient all-reduce crosses nodes; costs
            ``nodes`` times the sharded memory). Default: shard over all ranks.
        param_dtype: the dtype layers compute in: parameters are cast to it when gathered, while
            the sharded float32 master weights and optimizer states stay float32. ``bfloat16`` on
            GPUs; ``float32`` for an exact run (CPU).
        reduce_dtype: the dtype gradients are averaged over ranks in.
        reshard_after_forward: free each layer's gathered parameters after its forward (less
            memory; the backward gathers them again).
        process_group_backend: ``nccl`` / ``gloo``; default: from the device.
    """

    def __init__(self, hybrid: bool = False, param_dtype: str = "bfloat16", reduce_dtype: str = "float32",
                 reshard_after_forward: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend)
        self.hybrid = hybrid
        self.policy = MixedPrecisionPolicy(param_dtype=dtype_named(param_dtype, "strategy param_dtype"),
                                           reduce_dtype=dtype_named(reduce_dtype, "strategy reduce_dtype"))
        self.reshard_after_forward = reshard_after_forward

    def shard_mesh(self) -> DeviceMesh:
        """The ranks a parameter is sharded over: all of them, or (hybrid) those of one node, the
        nodes holding replicas."""
        device = self.root_device.type
        if self.hybrid:
            return init_device_mesh(device, (self.num_nodes, self.num_processes),
                                    mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(device, (self.world_size,), mesh_dim_names=("shard",))

    def shard_and_load(self, model: nn.Module, build: Callable[[], nn.Module]) -> None:
        """Shard ``model`` (built on the meta device), allocate this rank's shards, and fill them
        with the weights and buffers of ``build()``: a full model that global rank 0 alone builds,
        broadcast tensor by tensor. Prints each rank's peak memory while loading."""
        reset_peak_rss()
        before = rss_mb()
        self.shard(model)
        source = build() if self.global_rank == 0 else None
        full = source.state_dict() if source is not None else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers outside the state dict (rotary frequencies...) were left empty by `to_empty`.
        persistent = set(model.state_dict())
        theirs = dict(source.named_buffers()) if source is not None else {}
        for name, buffer in model.named_buffers():
            if name not in persistent:
                if source is not None:
                    buffer.copy_(theirs[name])
                dist.broadcast(buffer, src=0)
        del full, source, theirs
        sizes = tensor_mb(model)
        info(f"rank {self.global_rank}: weights loaded into shards; peak RSS {peak_rss_mb():.0f} MB, "
             f"{before:.0f} MB before loading; the model is {sum(sizes):.0f} MB, its largest tensor "
             f"{max(sizes):.0f} MB")

    def shard(self, model: nn.Module) -> None:
        """``fully_shard`` each decoder layer, then (untied) the decoder and the output layer, then
        the root; allocate this rank's shards on its device (``model`` may be on the meta device)."""
        kwargs: dict[str, Any] = {"mesh": self.shard_mesh(), "mp_policy": self.policy}
        output = model.get_output_embeddings()
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **kwargs)
        # A tied output layer shares the embedding's weight, so both stay in the root's unit, which
        # the model's own forward gathers; untied, the decoder and the output layer may be called
        # on their own too.
        if output is not None and not {id(p) for p in output.parameters()} & {
                id(p) for p in model.get_input_embeddings().parameters()}:
            fully_shard(model.get_decoder(), **kwargs)
            fully_shard(output, **kwargs)
        fully_shard(model, **kwargs)
        model.to_empty(device=self.root_device)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's blocks: the first ``nn.ModuleList`` inside ``model.get_decoder()`` that holds
    ``num_hidden_layers`` modules of one class (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``...)."""
    layers = int(model.config.get_text_config().num_hidden_layers)
    for module in model.get_decoder().modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and len({type(m) for m in module}) == 1:
            return module
    raise MioUserError(f"{type(model).__name__}: found no list of {layers} decoder layers (config.num_hidden_layers) "
                     f"to shard one by one")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights, gathered on CPU on global rank 0 (empty elsewhere): a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def tensor_mb(model: nn.Module) -> list[float]:
    """Megabytes of each parameter and buffer of the model, whole (tied ones once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return [t.numel() * t.element_size() / 2**20 for t in tensors]
