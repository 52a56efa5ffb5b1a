"""The house rules that hold the whole library: one name per class."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

MIO = Path(__file__).resolve().parents[1] / "mio"


def test_no_two_classes_in_mio_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(MIO.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(f"{path.relative_to(MIO.parent)}:{node.lineno}")
    assert len(where) > 50  # the walk found the library's classes
    shared = {name: places for name, places in where.items() if len(places) > 1}
    assert not shared, f"classes sharing a name (give each its own, from its role): {shared}"
