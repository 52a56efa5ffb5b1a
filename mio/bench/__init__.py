"""Benchmarks: `mio bench <part>`, each in ``mio/bench/<part>.py`` as ``bench_<part>(**sizes)``.

``SECONDS``: how long each takes at its default sizes on the project's reference machine (2 CPU
cores, no GPU, nothing else running; a loaded machine takes longer), announced before it starts.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Callable

from mio.userio import MioUserError

SECONDS = {"tokenizers": 215, "packing": 65, "data": 180, "train": 100, "generate": 110, "prepare": 10, "serve": 90}


def bench_module(part: str) -> ModuleType:
    return importlib.import_module(f"mio.bench.{part}")


def bench_function(part: str) -> Callable[..., dict[str, Any]]:
    return getattr(bench_module(part), f"bench_{part}")


def what_it_measures(part: str) -> str:
    """The first sentence of the bench module's docstring, without its `mio bench <part>` prefix."""
    doc = " ".join((bench_module(part).__doc__ or "").split())
    first = doc.split(". ")[0].rstrip(".")
    return first.split(": ", 1)[-1] if first.startswith("`mio bench") else first


def sizes(part: str, settings: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings -> keyword arguments of ``bench_<part>``, typed like their defaults."""
    params = inspect.signature(bench_function(part)).parameters
    out: dict[str, Any] = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or name not in params:
            raise MioUserError(f"--set {item}: bench {part} takes NAME=VALUE with NAME one of {sorted(params)}")
        default = params[name].default
        if isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[name] = type(default)(value)
        else:
            out[name] = value
    return out
