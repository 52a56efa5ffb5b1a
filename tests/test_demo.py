"""The demo's own parts (the full `mio demo` run is `make demo`, too long for the suite)."""

import json
import shutil

import numpy as np
import pytest

import mio.demo as demo
from mio.segments import Image, Text


def test_missing_sample_file_is_named(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    shutil.copytree(demo.SAMPLES, samples)
    first = json.loads((samples / "image_text.jsonl").read_text().splitlines()[0])
    (samples / first["image"]).unlink()
    monkeypatch.setattr(demo, "SAMPLES", samples)
    with pytest.raises(FileNotFoundError, match=f"image_text.jsonl:1: sample file {first['image']}"):
        demo.check_bundle()


def test_bundle_is_complete():
    demo.check_bundle()
    assert all((demo.STAGES / f"{name}.yaml").is_file() for name in demo.DEMO_STAGES)


def test_exact_match_is_strict():
    img = Image(np.arange(32))
    assert demo.same([Text(" a cat ")], [Text("a cat")])
    assert not demo.same([Text("a cat.")], [Text("a cat")])
    assert demo.same([img], [Image(np.arange(32))])
    assert not demo.same([Image(np.arange(1, 33))], [img])
    assert not demo.same([img, Text("x")], [img])
