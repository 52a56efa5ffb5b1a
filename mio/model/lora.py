"""LoRA fine-tuning with peft: adapters on the backbone's linear layers, plus trainable rows for
mio's added tokens, saved as a standard PEFT adapter folder that plain peft loads.

A LoRA run must still be able to learn new modalities, so the embedding and output rows of the
12,294 added tokens train too -- through peft's ``trainable_token_indices``, which keeps a
(rows, D) delta beside the frozen matrix instead of training the whole (V, D) matrix.

Also here: the trainable-parameter report printed at the start of every run, and the FSDP check
that refuses a wrap policy under which frozen and trainable parameters share a flat parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _Policy

from mio.vocab import VocabTable

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSettings:
    """What a LoRA run trains.

    Args:
        rank: rank r of every adapter (A is (r, in), B is (out, r)).
        alpha: scaling numerator; the update is ``alpha / rank * B @ A``.
        dropout: dropout on the adapter's input.
        target_modules: peft's ``target_modules``: module name suffixes (``["q_proj", "v_proj"]``),
            a regex, or ``"all-linear"`` (every linear layer except the output layer).
        train_new_tokens: train the embedding and output rows of mio's added tokens.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    train_new_tokens: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the linear layers to adapt, or 'all-linear'")


def new_token_indices(table: VocabTable) -> list[int]:
    """The ids of mio's added tokens (specials, image and speech codes): text_size .. total_size-1."""
    return list(range(table.text_size, table.total_size))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _token_rows(model: nn.Module, indices: list[int]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices`` for the input embedding and, when it is not tied to
    the embedding, the output layer (peft ties a tied output layer to the embedding's rows)."""
    embedding = model.get_input_embeddings()
    rows = {_module_name(model, embedding): indices}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embedding.weight:
        rows[_module_name(model, output)] = indices
    return rows


def apply_lora(model: nn.Module, settings: LoraSettings, table: VocabTable, base_path: str | Path) -> nn.Module:
    """Freeze ``model`` and wrap it in a peft ``PeftModel`` with LoRA adapters (and trainable
    added-token rows); ``base_path`` is recorded in the adapter config as its base model."""
    from peft import LoraConfig, get_peft_model

    have = model.get_input_embeddings().weight.shape[0]
    if have < table.total_size:
        raise ValueError(f"{base_path}: the model has {have} embedding rows, its vocabulary table needs "
                         f"{table.total_size}: LoRA needs a backbone already extended with mio's tokens")
    rows = _token_rows(model, new_token_indices(table)) if settings.train_new_tokens else None
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, trainable_token_indices=rows,
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"lora.target_modules={settings.target_modules!r} does not fit this backbone "
                         f"({type(model).__name__}): {e}") from None
    # peft records the path the model was loaded from as given (maybe relative to the cwd);
    # an absolute path lets `PeftModel.from_pretrained` / `mio export` find it from anywhere.
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# --- trainable parameter report ---------------------------------------------------------------
@dataclass
class ParameterReport:
    """Parameter counts of a model: all, trainable, and per group (trainable, total)."""

    total: int
    trainable: int
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        share = 100.0 * self.trainable / max(self.total, 1)
        out = [f"parameters: {self.total:,} total, {self.trainable:,} trainable ({share:.2f}%)"]
        width = max((len(g) for g in self.groups), default=0)
        for name, (trainable, total) in self.groups.items():
            out.append(f"  {name:<{width}}  {trainable:>14,} trainable of {total:>14,}")
        return out


def _group(name: str, param: nn.Parameter, embedding: set[int], output: set[int]) -> str:
    if "lora_" in name:
        return "lora adapters"
    if "trainable_tokens_delta" in name:
        return "added-token rows"
    if id(param) in embedding:
        return "input embedding"
    if id(param) in output:
        return "output layer"
    lowered = name.lower()
    if "norm" in lowered:
        return "norms"
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered or "ffn" in lowered:
        return "mlp"
    return "other"


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters (tied ones once) by group: LoRA adapters, added-token rows, input
    embedding, output layer, attention, mlp, norms, other."""
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    out_layer = model.get_output_embeddings()
    output = {id(p) for p in out_layer.parameters()} if out_layer is not None else set()
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        g = groups.setdefault(_group(name, p, embedding, output), [0, 0])
        g[1] += p.numel()
        if p.requires_grad:
            g[0] += p.numel()
    total = sum(t for _, t in groups.values())
    trainable = sum(t for t, _ in groups.values())
    return ParameterReport(total, trainable, {k: (v[0], v[1]) for k, v in sorted(groups.items())})


# --- FSDP -------------------------------------------------------------------------------------
class LoraWrapPolicy(ModuleWrapPolicy):
    """FSDP (1) wrap policy for LoRA runs: each transformer block is a unit, and so is each
    leaf module whose own parameters all train (the LoRA A and B matrices), so no flat
    parameter mixes frozen and trainable weights. A ``ModuleWrapPolicy`` subclass, so a stage
    YAML can name it: ``auto_wrap_policy: {class_path: mio.model.lora.LoraWrapPolicy}``.

    Args:
        block_classes: class names of the transformer blocks; default: the backbone's
            ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).
    """

    def __init__(self, block_classes: list[str] | None = None) -> None:
        super().__init__(())
        self.block_classes = block_classes

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module],
                    root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        blocks = set(self.block_classes or _no_split_modules(root_module))
        return {m: copy.copy(root_kwargs) for m in root_module.modules()
                if m not in ignored_modules and (type(m).__name__ in blocks or _trainable_leaf(m))}

    def __call__(self, module: nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        raise TypeError("LoraWrapPolicy decides over the whole model: pass it to FSDP as auto_wrap_policy, "
                        "not as a per-module callable")


def _no_split_modules(root: nn.Module) -> list[str]:
    names: list[str] = []
    for m in root.modules():
        names += list(getattr(m, "_no_split_modules", None) or [])
    return names


def _trainable_leaf(module: nn.Module) -> bool:
    """A leaf module called in the forward pass whose own parameters all train. Parameter
    containers (peft keeps added-token deltas in a ParameterDict it never calls) are not: as
    FSDP units they would never be gathered."""
    if isinstance(module, (nn.ParameterDict, nn.ParameterList)) or next(module.children(), None) is not None:
        return False
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own)


def fsdp_units(root: nn.Module, policy: Any) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Which FSDP (1) unit -- the nearest wrapped ancestor, or the root -- holds each parameter
    under ``policy`` (a torch ``_Policy``, a ``LoraWrapPolicy``, a legacy callable policy, a set
    of module classes, or None). Keys are unit names ("" is the root)."""
    wrapped = _wrapped_modules(root, policy)
    units: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, name: str, unit: str) -> None:
        if module in wrapped:
            unit = name
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                units.setdefault(unit, []).append((f"{name}.{pname}" if name else pname, p))
        for cname, child in module.named_children():
            visit(child, f"{name}.{cname}" if name else cname, unit)

    visit(root, "", "")
    return units


def _wrapped_modules(root: nn.Module, policy: Any) -> set[nn.Module]:
    if policy is None:
        return set()
    if isinstance(policy, (set, frozenset, list, tuple)):
        policy = ModuleWrapPolicy(policy)
    if isinstance(policy, _Policy):
        return set(policy._run_policy(root, set(), {})) - {root}
    return _legacy_wrapped(root, policy)


def _legacy_wrapped(root: nn.Module, policy: Callable[..., bool]) -> set[nn.Module]:
    """The modules FSDP's recursive wrap would wrap under a legacy callable policy
    (``policy(module=, recurse=, nonwrapped_numel=)``, bottom-up, the root excluded)."""
    wrapped: set[nn.Module] = set()

    def visit(module: nn.Module, is_root: bool) -> int:  # returns the numel it wrapped
        numel = sum(p.numel() for p in module.parameters())
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        done = sum(visit(child, False) for child in module.children())
        if not is_root and policy(module=module, recurse=False, nonwrapped_numel=numel - done):
            wrapped.add(module)
            return numel
        return done

    visit(root, True)
    return wrapped


def check_fsdp_units(root: nn.Module, policy: Any) -> None:
    """Refuse (ValueError) a wrap policy under which a flat parameter would hold both frozen and
    trainable parameters: FSDP would keep full-size gradients for the frozen ones (or refuse
    itself, deep in torch, without ``use_orig_params``)."""
    for unit, params in fsdp_units(root, policy).items():
        frozen = [n for n, p in params if not p.requires_grad]
        trainable = [n for n, p in params if p.requires_grad]
        if not frozen or not trainable:
            continue
        where = unit or "the root module"
        hint = ("use strategy.auto_wrap_policy: mio.model.lora.LoraWrapPolicy (each LoRA matrix and "
                "each transformer block its own unit)")
        if any("trainable_tokens_delta" in n for n in trainable):
            hint = ("peft keeps the added-token rows beside the frozen embedding/output matrix in one "
                    "module, so no FSDP (1) wrap policy can separate them: set model.lora.train_new_tokens: "
                    "false, or train with DDP (strategy: ddp)")
        raise ValueError(f"FSDP would put frozen and trainable parameters into one flat parameter (unit "
                         f"{where!r}: frozen {frozen[:2]}..., trainable {trainable[:2]}...); {hint}")


def check_strategy(root: nn.Module, strategy: Any) -> None:
    """Under Lightning's FSDPStrategy (FSDP 1, flat parameters), run :func:`check_fsdp_units` with
    the strategy's wrap policy. Other strategies shard per parameter or not at all."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        check_fsdp_units(root, strategy.kwargs.get("auto_wrap_policy"))
