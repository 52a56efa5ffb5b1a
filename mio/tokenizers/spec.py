"""Tokenizer specs: one YAML file per tokenizer (`tokenizers/*.yaml`), read into a plain dict.

A spec names its `kind` (seed | speechtokenizer | video), its sizes and constants, and either
checkpoint files (real tokenizers, paths relative to `root`) or a `seed` for random weights (tiny
ones).  Nothing is ever fetched: a missing file is one error naming every missing path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mio.userio import MioUserError, load_yaml_mapping

KINDS = ("seed", "speechtokenizer", "video")


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a tokenizer spec YAML file into a dict (with its `kind` checked)."""
    spec = load_yaml_mapping(path, "tokenizer spec")
    check_kind(spec, str(path))
    return spec


def check_kind(spec: dict[str, Any], where: str) -> str:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise MioUserError(f"tokenizer spec {where}: `kind` must be one of {KINDS}, got {kind!r}")
    return kind


class MissingCheckpointError(FileNotFoundError):
    """Raised once with every missing checkpoint file of a spec."""


@dataclass(frozen=True)
class CheckpointFile:
    key: str  # the spec key that names it
    path: Path
    what: str  # what the user should put there


def resolve_checkpoints(spec: dict[str, Any], wanted: dict[str, str], where: str) -> dict[str, Path]:
    """Resolve `spec[key]` for each key of `wanted` (key -> description) against `spec['root']`.

    Raises MissingCheckpointError naming every missing file and what belongs there.
    """
    root = Path(os.path.expandvars(os.path.expanduser(str(spec.get("root", ".")))))
    files = []
    for key, what in wanted.items():
        if not spec.get(key):
            raise MioUserError(f"tokenizer spec {where}: `{key}` is required ({what})")
        files.append(CheckpointFile(key, root / os.path.expanduser(str(spec[key])), what))
    missing = [f for f in files if not f.path.is_file()]
    if missing:
        lines = "\n".join(f"  - {f.path}  ({f.key}: {f.what})" for f in missing)
        raise MissingCheckpointError(
            f"tokenizer spec {where}: {len(missing)} checkpoint file(s) missing:\n{lines}\n"
            f"Put the released files there (MIO's tree), or set `root` in the spec to the folder that "
            f"holds them. Nothing is downloaded."
        )
    return {f.key: f.path for f in files}


def resolve_device(name: str | None) -> torch.device:
    """`auto` (default): CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
