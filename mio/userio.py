"""What every `mio` command shares at its edge with the user: how a user error ends a command, and
how a YAML file the user wrote (a tokenizer spec, a data recipe) is read."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from mio.assets import resolve_declarative

# A missing file or a bad value: the user can fix it, so the message is enough (no traceback).
USER_ERRORS = (FileNotFoundError, ValueError)


def log(msg: str) -> None:
    print(f"[mio] {msg}", file=sys.stderr, flush=True)


def run_command(command: Callable[[], int]) -> int:
    """``command()``'s exit status; a user error prints ``[mio] error: ...`` and gives 2 (nothing done)."""
    try:
        return command()
    except USER_ERRORS as e:
        log(f"error: {e}")
        return 2


def load_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (``what``: "recipe", "tokenizer spec"), with errors that
    name the file."""
    p = resolve_declarative(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {p} must be a mapping of keys, got {type(raw).__name__}")
    return raw
