"""Floating-point dtypes as configs and command lines spell them: the one map from names to
torch dtypes, and the two meanings ``auto`` has, each under its own name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mio.userio import MioUserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, setting: str) -> torch.dtype:
    """The dtype ``name`` spells, or a ValueError naming ``setting`` and the choices."""
    if name not in DTYPES:
        raise MioUserError(f"{setting} {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def tokenizer_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A modality tokenizer's dtype; ``auto`` (or none): float16 on CUDA, as MIO's released
    pipeline ran its tokenizers, float32 on CPU."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype_named(name, "tokenizer spec dtype (or auto)")


def recorded_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's ``config.json`` records (float32 if none): what ``auto`` means
    for a model loaded to be changed and saved again."""
    config = json.loads((folder / "config.json").read_text())
    recorded = config.get("dtype") or config.get("torch_dtype") or "float32"
    if recorded not in DTYPES:
        raise MioUserError(f"{folder / 'config.json'}: dtype {recorded!r} is not one of {sorted(DTYPES)}; pass --dtype")
    return DTYPES[recorded]
