"""The bad-input battery: each bad file is made here and is either skipped with a counted reason or
stops the run with an error naming it; the manifest's counts add up (samples + skipped = seen)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image as PILImage
from prepare_support import write_tar

from mio.data.prepare import prepare
from mio.data.recipe import Recipe
from mio.data.shards import iter_shard, list_shards
from mio.data.tokenize_rows import recipe_tokenizers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tokenizers" / "tiny"
PHOTO = ROOT / "data_recipes" / "samples" / "images" / "cat.jpg"


def _recipe(folder: Path, body: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(body)
    return path


def _rows(path: Path, rows: list[dict | bytes]) -> None:
    with open(path, "wb") as fh:
        for r in rows:
            fh.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def _photo(size: tuple[int, int]) -> PILImage.Image:
    return PILImage.open(PHOTO).convert("RGB").resize(size)


def _added_up(m: dict) -> None:
    assert m["samples"] + sum(m["skipped"].values()) == m["seen"]
    assert sum(len(list(iter_shard(s))) for s in list_shards(Path(m["_out"]))) == m["samples"]


def _codes(tokenizer_kind: str, recipe: Path):
    return recipe_tokenizers(Recipe.load(recipe), TINY, local_rank=0).get(tokenizer_kind)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_images")
    shutil.copy(PHOTO, d / "good.jpg")
    data = PHOTO.read_bytes()
    (d / "corrupt.jpg").write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)))
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "empty.jpg").write_bytes(b"")
    rgb = _photo((256, 256))
    rgb.quantize(64).save(d / "palette.png", transparency=0)  # palette with a transparent entry
    rgba = rgb.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:, :128, 3] = 0  # left half fully transparent
    PILImage.fromarray(alpha, "RGBA").save(d / "alpha.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    _photo((100, 100)).save(d / "small.jpg")
    _photo((500, 224)).save(d / "wide.jpg")
    rows = [
        {"image": "good.jpg", "caption": "a cat"},
        {"image": "corrupt.jpg", "caption": "corrupt bytes"},
        {"image": "truncated.jpg", "caption": "cut short"},
        {"image": "empty.jpg", "caption": "zero bytes"},
        {"image": "palette.png", "caption": "palette with transparency"},
        {"image": "alpha.png", "caption": "half transparent"},
        {"image": "cmyk.jpg", "caption": "cmyk jpeg"},
        {"image": "small.jpg", "caption": "too small"},
        {"image": "wide.jpg", "caption": "too wide"},
        {"image": "missing.jpg", "caption": "no such file"},
        b'{"image": "good.jpg", "caption": "caf\xe9 latin-1"}',
        b'{"image": "good.jpg", "caption": ',
        b'["a", "list"]',
        {"image": "good.jpg"},
        {"image": "good.jpg", "caption": "   "},
    ]
    _rows(d / "rows.jsonl", rows)
    recipe = _recipe(d, "data_type: image_text\ninput: rows.jsonl\nfields: {image: image, text: caption}\n"
                        "tokenizers: {image: seed.yaml}\nshard_size: 4\nbatch_size: 3\n")
    m = prepare(recipe, d / "out", tokenizer_dir=TINY)
    m["_out"] = str(d / "out")
    return d, recipe, m


def test_image_battery_counts(image_run):
    _, _, m = image_run
    assert m["skipped"] == {"aspect_ratio": 1, "bad_json": 2, "empty_file": 1, "image_too_small": 1,
                            "missing_field": 1, "missing_file": 1, "not_utf8": 1, "text_too_short": 1,
                            "unreadable_image": 2}
    assert m["samples"] == 4 and m["seen"] == 15
    _added_up(m)
    details = " ".join(e["detail"] for e in m["skipped_examples"])
    for where in ("rows.jsonl:11", "rows.jsonl:12", "missing.jpg", "corrupt.jpg", "truncated.jpg", "wide.jpg"):
        assert where in details


def test_palette_alpha_cmyk_are_converted_not_dropped(image_run):
    d, recipe, m = image_run
    tok = _codes("image", recipe)
    stored = {s.segments[1].text: s.segments[0].codes for sh in list_shards(d / "out") for s in iter_shard(sh)}
    pal = PILImage.open(d / "palette.png")
    pal_rgba = np.asarray(pal.convert("RGBA")).astype(np.float64)
    a = pal_rgba[..., 3:] / 255.0
    ref = PILImage.fromarray(np.round(pal_rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8), "RGB")
    assert np.array_equal(stored["palette with transparency"], tok.encode([ref])[0])
    half = np.asarray(PILImage.open(d / "alpha.png").convert("RGB")).copy()
    half[:, :128] = 255  # what a viewer shows: the transparent half is white
    assert np.array_equal(stored["half transparent"], tok.encode([PILImage.fromarray(half)])[0])
    cmyk_rgb = PILImage.open(d / "cmyk.jpg").convert("RGB")
    assert np.array_equal(stored["cmyk jpeg"], tok.encode([cmyk_rgb])[0])


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_speech")
    rng = np.random.default_rng(0)
    t16 = np.arange(16000) / 16000
    voice16 = (0.3 * np.sin(2 * np.pi * 180 * t16) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t16))).astype(np.float32)
    sf.write(d / "pcm16.wav", voice16, 16000, subtype="PCM_16")
    t44 = np.arange(int(1.2 * 44100)) / 44100
    voice44 = (0.3 * np.sin(2 * np.pi * 220 * t44) + 0.05 * rng.standard_normal(t44.size)).astype(np.float32)
    sf.write(d / "mono44.wav", voice44, 44100, subtype="FLOAT")
    sf.write(d / "stereo44.wav", np.stack([voice44, voice44], 1), 44100, subtype="FLOAT")
    sf.write(d / "full.flac", np.tile(voice16, 2), 16000, subtype="PCM_16")
    data = (d / "full.flac").read_bytes()
    (d / "truncated.flac").write_bytes(data[: len(data) // 2])
    sf.write(d / "long.wav", np.zeros(30 * 16000, np.float32), 16000, subtype="PCM_16")
    (d / "empty.wav").write_bytes(b"")
    rows = [{"audio": f, "text": f"clip {f}"} for f in
            ("pcm16.wav", "stereo44.wav", "mono44.wav", "truncated.flac", "long.wav", "empty.wav", "missing.wav")]
    _rows(d / "rows.jsonl", rows)
    recipe = _recipe(d, "data_type: speech_text\ninput: rows.jsonl\ntokenizers: {speech: speechtokenizer.yaml}\n"
                        "shard_size: 10\n")
    m = prepare(recipe, d / "out", tokenizer_dir=TINY)
    m["_out"] = str(d / "out")
    return d, recipe, m


def test_speech_battery_counts(speech_run):
    _, _, m = speech_run
    assert m["skipped"] == {"empty_file": 1, "missing_file": 1, "speech_too_long": 1, "unreadable_audio": 1}
    assert m["samples"] == 3 and m["seen"] == 7
    _added_up(m)
    assert any("truncated.flac" in e["detail"] for e in m["skipped_examples"])


def test_stereo_is_averaged_and_resampled(speech_run):
    d, recipe, _ = speech_run
    stored = {s.segments[1].text: s.segments[0].codes for sh in list_shards(d / "out") for s in iter_shard(sh)}
    stereo, mono = stored["clip stereo44.wav"], stored["clip mono44.wav"]
    assert np.array_equal(stereo, mono)  # identical channels average to the mono signal
    frames = int(np.ceil(round(1.2 * 16000) / 320))
    assert stereo.shape == (4, frames)  # resampled to 16 kHz: 50 frames per second
    assert stored["clip pcm16.wav"].shape == (4, 50)


def test_truncated_tar_shard_in_input(tmp_path):
    jpg = PHOTO.read_bytes()
    good = [(f"{i:04d}", {"jpg": jpg, "txt": f"photo {i}".encode()}) for i in range(3)]
    write_tar(tmp_path / "a.tar", good + [("0003", {"jpg": jpg, "txt": b"caf\xe9"})])
    write_tar(tmp_path / "b.tar", [(f"1{i:03d}", {"jpg": jpg, "txt": f"more {i}".encode()}) for i in range(4)])
    data = (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmembers()[5].offset_data + 2
    (tmp_path / "b.tar").write_bytes(data[:cut])  # cut inside the third sample's last member
    recipe = _recipe(tmp_path, "data_type: image_text\ninput: {format: tar, paths: '*.tar'}\n"
                               "fields: {image: jpg, text: txt}\ntokenizers: {image: seed.yaml}\n")
    m = prepare(recipe, tmp_path / "out", tokenizer_dir=TINY)
    m["_out"] = str(tmp_path / "out")
    assert m["skipped"] == {"not_utf8": 1, "truncated_input": 1}
    assert m["samples"] == 5  # 3 of a.tar, the 2 whole samples before the cut in b.tar
    assert [i["rows"] for i in m["inputs"]] == [4, 3]
    _added_up(m)
    assert any("b.tar" in e["detail"] for e in m["skipped_examples"] if e["reason"] == "truncated_input")


def test_empty_input_stops_with_its_name(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    recipe = _recipe(tmp_path, "data_type: text\ninput: empty.jsonl\n")
    with pytest.raises(ValueError, match="holds no rows.*empty.jsonl"):
        prepare(recipe, tmp_path / "out")
    recipe = _recipe(tmp_path, "data_type: text\ninput: 'nothing-*.jsonl'\n")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        prepare(recipe, tmp_path / "out2")


def test_all_rows_bad_stops_and_leaves_nothing_that_blocks_the_fix(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"body": "a"}\n{"body": "b", "id": 2}\n')
    recipe = _recipe(tmp_path, "data_type: text\ninput: rows.jsonl\n")
    with pytest.raises(ValueError, match=r"no sample survived.*missing_field.*no field 'text'; its keys: body, id"):
        prepare(recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    recipe.write_text("data_type: text\ninput: rows.jsonl\nfields: {text: body}\n")  # the fix
    assert prepare(recipe, tmp_path / "out")["samples"] == 2


def test_recipe_errors_name_the_problem(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n')
    for body, match in [("data_type: nope\ninput: rows.jsonl\n", "data_type must be one of"),
                        ("data_type: text\ninput: rows.jsonl\nshard_sise: 3\n", "unknown keys.*shard_sise"),
                        ("data_type: text\ninput: rows.jsonl\nfilters: {min_chars: 3}\n", "filters"),
                        ("data_type: text\n", "input"),
                        ("data_type: text\ninput: {paths: rows.jsonl, format: xml}\n", "input format")]:
        with pytest.raises(ValueError, match=match):
            prepare(_recipe(tmp_path, body), tmp_path / "out")
    (tmp_path / "rows.jsonl").write_text('{"image": "a.jpg", "text": "x"}\n')
    (tmp_path / "a.jpg").write_bytes(PHOTO.read_bytes())
    with pytest.raises(ValueError, match="names no image tokenizer"):
        prepare(_recipe(tmp_path, "data_type: image_text\ninput: rows.jsonl\n"), tmp_path / "out3")
