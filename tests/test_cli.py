"""`mio` itself: `--version`, `--help` text for every command, exit statuses that tell the truth,
benchmarks that announce themselves, and the filter of third-party noise (off with -v)."""

from __future__ import annotations

import json
import logging
import re
import warnings
from importlib.metadata import version

import pytest
from train_support import ROOT

from mio.bench import SECONDS, bench_function, sizes, what_it_measures
from mio.cli import main
from mio.noise import NoiseFilter, quiet

CAT = str(ROOT / "data_recipes" / "samples" / "images" / "cat.jpg")


def run(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    """Exit status, stdout and stderr of `mio ARGV`, whether it returns or exits."""
    try:
        status = main(list(argv))
    except SystemExit as done:
        status = done.code or 0
    out, err = capsys.readouterr()
    return status, out, err


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"mio {version('mio')}"


def test_every_command_has_help_that_says_what_it_does(capsys):
    listing = run(capsys, "--help")[1]
    commands = re.findall(r"^    (\S+)\s{2,}\S", listing.split("COMMAND", 2)[-1], re.MULTILINE)
    assert {"demo", "tokenize", "prepare", "inspect", "fit", "generate", "export", "report", "bench"} <= set(commands)
    for name in commands:
        status, out, _ = run(capsys, name, "--help")
        assert status == 0 and "usage:" in out, name
        text = " ".join(out.split())
        assert len(text) > len(" ".join(out.split("\n")[0].split())) + 40, f"`mio {name} --help` says too little"


def test_tokenize_exits_1_when_a_file_failed(capsys, tmp_path):
    status, out, err = run(capsys, "tokenize", "--spec", str(ROOT / "tokenizers" / "tiny" / "seed.yaml"), CAT,
                           str(tmp_path / "gone.jpg"))
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and len(rows) == 2  # every file tried, the failure reported and counted
    assert len(rows[0]["codes"]) == 32 and "error" in rows[1] and "1 of 2 file(s)" in err


def test_every_bench_says_what_it_measures_and_takes_typed_sizes():
    for part in SECONDS:
        assert len(what_it_measures(part)) > 20 and callable(bench_function(part))
    assert what_it_measures("packing") == "masked packing against pad-to-longest batches, measured in one run"
    assert sizes("packing", ["samples=500", "device=cpu"]) == {"samples": 500, "device": "cpu"}
    with pytest.raises(ValueError, match="NAME one of .*'samples'"):
        sizes("packing", ["sample=500"])


def test_noise_is_filtered_and_the_rest_shows(monkeypatch):
    noise = NoiseFilter()
    record = lambda msg: logging.LogRecord("x", logging.INFO, "f", 1, msg, None, None)  # noqa: E731
    assert not noise.filter(record("GPU available: False, used: False"))
    assert not noise.filter(record("💡 Tip: For seamless cloud logging, try installing [litlogger]"))
    assert not noise.filter(record("The new embeddings will be initialized from a multivariate normal distribution"))
    assert not noise.filter(record("`Trainer.fit` stopped: `max_steps=200` reached."))
    assert noise.filter(record("`Trainer.fit` stopped: `max_epochs=1` reached."))  # a stage that ran out of data
    assert noise.filter(record("Restoring states from the checkpoint path at runs/x/checkpoints/step=4.ckpt"))
    monkeypatch.setattr(logging.getLogger("lightning.pytorch.utilities.rank_zero"), "filters", [])
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        warnings.warn("It is recommended to use `self.log('val/loss', ..., sync_dist=True)` when logging on epoch "
                      "level in distributed setting to accumulate the metric across devices.", UserWarning, stacklevel=1)
        warnings.warn("something to act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something to act on"]
    assert any(isinstance(f, NoiseFilter) for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters)
