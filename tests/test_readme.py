"""The README runs as written: every command of its ```bash blocks and every ```python block, top to
bottom, in a scratch folder that holds the repository's declarative folders (stages/, tokenizers/,
data_recipes/), with nothing added but the trial settings the README's own table gives (fewer
steps, smaller bench sizes). A command someone adds to the README is run here too.

Commands run in this process through `mio`'s entry point (`mio.cli.main`), as the console script
runs them: starting a Python per command would cost more than the commands do on the tiny assets.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mio.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DECLARATIVE = ("stages", "tokenizers", "data_recipes")
# A fenced block, and the note before it when the README says this test does not run it and why:
# `<!-- not run by tests/test_readme.py: REASON; tests/OTHER.py runs ... -->` (commands needing what
# no test machine has, such as MIO's released 7B weights; the note names the test that covers them).
BLOCK = re.compile(r"(?:^<!-- not run by tests/test_readme\.py: (?P<why>.*?) -->\n)?^```(?P<lang>\w+)\n(?P<body>.*?)^```",
                   re.MULTILINE | re.DOTALL)
# What `make demo` / `make test` do is run by CI itself (they build the virtual environment).
MAKE_TARGETS = {"demo", "test"}


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, why it is not run or None) of every fenced block, in order; a command
    continued with a trailing backslash is one line."""
    return [(m["lang"], m["body"].replace("\\\n", " "), m["why"]) for m in BLOCK.finditer(text)]


def trial_settings(text: str) -> dict[tuple[str, ...], list[str]]:
    """The README's table `| command | trial settings |`: command prefix -> arguments to append."""
    table = text.split("| command | trial settings |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        command, settings = (re.sub(r"`", "", cell).strip() for cell in line.strip("|").split("|"))
        rows[tuple(shlex.split(command))] = shlex.split(settings)
    return rows


def with_trial(argv: list[str], trial: dict[tuple[str, ...], list[str]]) -> list[str]:
    prefixes = [p for p in trial if tuple(argv[:len(p)]) == p]
    return argv + (trial[max(prefixes, key=len)] if prefixes else [])


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def check_output(argv: list[str], out: str, err: str) -> None:
    """What the README says a command leaves behind (its last line of output, or its --out folder)."""
    command, last = argv[1], (out.strip().splitlines() or [""])[-1]
    if command == "bench":
        assert f"[mio] bench {argv[2]}: " in err and " It takes about " in err  # announced before it starts
        assert isinstance(json.loads(last), dict)  # the figures, as one JSON object on the last line
    elif command == "prepare":
        assert Path(last) == Path(option(argv, "--out")) / "manifest.json"
    elif command == "fit" and "--print_config" not in argv:
        assert (Path(last) / "config.json").is_file() or (Path(last) / "adapter_config.json").is_file()
    elif command == "export":
        assert (Path(option(argv, "--out")) / "config.json").is_file()
    elif command == "generate":  # one prompt: --out/transcript.md; --prompts: one folder per prompt
        assert any(Path(option(argv, "--out")).glob("**/transcript.md"))
    elif command == "eval":
        assert (Path(option(argv, "--out")) / "metrics.json").is_file() and isinstance(json.loads(last), dict)
    elif command == "report":
        assert Path(last) == Path(argv[2]) / "report.html" and "Loss per modality" in Path(last).read_text()


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    for name in DECLARATIVE:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what `mio` sets; undone after the test
    text = README.read_text()
    trial = trial_settings(text)
    ran: list[str] = []
    for language, body, not_run in blocks(text):
        if not_run is not None:
            covered_by = re.findall(r"tests/\w+\.py", not_run)
            assert covered_by and all((ROOT / t).is_file() for t in covered_by), f"README: {not_run!r} names no test"
            continue
        if language == "python":
            exec(compile(body, f"{README.name} (python block)", "exec"), {"__name__": "readme"})
            ran.append("python")
            continue
        if language != "bash":
            continue
        for line in body.splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if argv[0] == "make":
                assert set(argv[1:]) <= MAKE_TARGETS, f"README runs {line!r}: teach this test what it does"
                continue
            assert argv[0] == "mio", f"README runs {line!r}: this test runs `mio` commands; teach it this one"
            argv = with_trial(argv, trial)
            try:
                status = main(argv[1:])
            except SystemExit as done:  # `--print_config` and `--help` end there, as the console script does
                status = done.code or 0
            out, err = capsys.readouterr()
            assert status == 0, f"`{shlex.join(argv)}` exited {status}:\n{err[-3000:]}"
            check_output(argv, out, err)
            ran.append(argv[1])
    # The path the issue names, whatever else the README grows.
    assert {"tokenize", "prepare", "inspect", "fit", "export", "generate", "eval", "report", "bench", "python"} <= set(ran)
    assert sum(1 for _ in ran if _ == "generate") >= 3
