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


def test_grounding_joins_the_stages_own_datasets():
    """Stage I gets location tokens and the grounding data beside its own; SFT the grounding tasks;
    the stage files are read, not copied."""
    import yaml

    first = demo.grounding_overrides(demo.STAGES / "1_alignment.yaml")
    assert first[0] == "--model.location_tokens={scheme: bins, size: 32}"
    own = yaml.safe_load((demo.STAGES / "1_alignment.yaml").read_text())["data"]["datasets"]
    assert json.loads(first[1].removeprefix("--data.datasets=")) == [*own, demo.GROUNDING_DATA["1_alignment"]]
    sft = json.loads(demo.grounding_overrides(demo.STAGES / "4_sft.yaml")[0].removeprefix("--data.datasets="))
    assert sft[-1]["tasks"] == ["refexp", "refexp_generation"] and sft[:-1] == \
        yaml.safe_load((demo.STAGES / "4_sft.yaml").read_text())["data"]["datasets"]
    assert demo.grounding_overrides(demo.STAGES / "2_interleaved.yaml") == []
