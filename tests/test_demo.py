"""The demo's own parts (the full `mio demo` run is `make demo`, too long for the suite)."""

import json
import shutil

import pytest

import mio.demo as demo


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


def test_missing_grounding_photo_is_named(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    shutil.copytree(demo.SAMPLES, samples)
    regions = samples / "grounding" / "region_descriptions.json"
    rows = json.loads(regions.read_text())
    rows[0]["id"] = "no_such_photo"
    regions.write_text(json.dumps(rows))
    monkeypatch.setattr(demo, "SAMPLES", samples)
    with pytest.raises(FileNotFoundError, match="photo images/no_such_photo.jpg is missing"):
        demo.check_bundle()
