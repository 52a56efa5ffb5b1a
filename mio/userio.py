"""What every `mio` command shares at its edge with the user: the error a user must fix, how it
ends a command, and how a YAML file the user wrote (a tokenizer spec, a data recipe) is read."""

from __future__ import annotations

import os
from typing import Any, Callable

import yaml

from mio.assets import resolve_declarative
from mio.log import error


class MioUserError(ValueError):
    """Something the user must fix (a setting, an input file, a folder): the message names it and
    says what to do, and a command ends with it alone (exit status 2, no traceback). A ValueError
    for compatibility: code that catches bad values catches these too."""


# A missing file or a value the user must fix: the message is enough. Any other error is mio's
# own and keeps its traceback.
USER_ERRORS = (MioUserError, FileNotFoundError)


def run_command(command: Callable[[], int]) -> int:
    """``command()``'s exit status; a user error prints ``[mio] error: ...`` and gives 2 (nothing done)."""
    try:
        return command()
    except USER_ERRORS as e:
        error(f"error: {e}")
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
        raise MioUserError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise MioUserError(f"{what} {p} must be a mapping of keys, got {type(raw).__name__}")
    return raw
