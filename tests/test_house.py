"""The house rules that hold the whole library: one name per class, user errors that end a command
while mio's own keep their traceback, and one logger whose level `-v` / `-q` set."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from mio.cli import main
from mio.log import LOGGER, info, set_verbosity, warning
from mio.userio import MioUserError, run_command

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


def test_a_user_error_ends_the_command_and_an_internal_one_keeps_its_traceback(capsys) -> None:  # noqa: ANN001
    def user_error() -> int:
        raise MioUserError("recipe r.yaml: shard_size must be an integer >= 1, got 0")

    assert run_command(user_error) == 2
    assert capsys.readouterr().err == "[mio] error: recipe r.yaml: shard_size must be an integer >= 1, got 0\n"

    def internal_error() -> int:
        raise ValueError("a bug of mio's own")

    with pytest.raises(ValueError, match="a bug of mio's own"):
        run_command(internal_error)


def test_verbosity_sets_what_the_mio_logger_shows(capsys) -> None:  # noqa: ANN001
    try:
        for verbose, quiet, shown in ((False, False, "info warning"), (False, True, "warning"),
                                      (True, False, "debug info warning")):
            set_verbosity(verbose=verbose, quiet=quiet)
            LOGGER.debug("debug")
            info("info")
            warning("warning")
            assert capsys.readouterr().err == "".join(f"[mio] {w}\n" for w in shown.split())
        info("two\nlines")  # each line of a message carries the prefix
        assert capsys.readouterr().err == "[mio] two\n[mio] lines\n"
    finally:
        set_verbosity()


def test_mio_q_keeps_the_error_of_a_command(tmp_path, capsys) -> None:  # noqa: ANN001
    missing = tmp_path / "missing.yaml"
    assert main(["-q", "prepare", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"[mio] error: recipe {missing} does not exist\n"
    set_verbosity()
