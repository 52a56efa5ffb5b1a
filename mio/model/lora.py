"""LoRA fine-tuning with peft: adapters on the backbone's linear layers, plus trainable rows for
mio's added tokens, saved as a standard PEFT adapter folder that plain peft loads.

A LoRA run must still be able to learn new modalities, so the embedding and output rows of the
12,294 added tokens train too -- through peft's ``trainable_token_indices``, which keeps a
(rows, D) delta beside the frozen matrix instead of training the whole (V, D) matrix.

Also here: the trainable-parameter report printed at the start of every run. Under FSDP2
(mio/train/sharding.py) every parameter is sharded on its own, so frozen weights, adapters and
added-token rows live side by side in one unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from mio.userio import MioUserError
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
            raise MioUserError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise MioUserError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MioUserError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise MioUserError("lora.target_modules is empty: name the linear layers to adapt, or 'all-linear'")


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
        raise MioUserError(f"{base_path}: the model has {have} embedding rows, its vocabulary table needs "
                         f"{table.total_size}: LoRA needs a backbone already extended with mio's tokens")
    rows = _token_rows(model, new_token_indices(table)) if settings.train_new_tokens else None
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, trainable_token_indices=rows,
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise MioUserError(f"lora.target_modules={settings.target_modules!r} does not fit this backbone "
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
