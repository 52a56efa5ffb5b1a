"""`mio generate` end to end, and bad input.

A model folder as `mio fit` leaves it (tokenizer specs recorded) needs no flag but --model to
decode its answer. MIO's release layout: tests/test_mio_release.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_generate_support import SAMPLES, one_thread, save_media_model, text_tokenizer  # noqa: F401

from mio.generate.cli import generate_main
from mio.generate.generator import Generator
from mio.generate.media import MediaFile
from mio.generate.prompt import prompt_items
from mio.segments import Image, Text
from mio.vocab import VocabTable

CAT = SAMPLES / "images" / "cat.jpg"
CLIP = SAMPLES / "speech" / "clip01.wav"
VIDEO = SAMPLES / "videos" / "cafe.mp4"


@pytest.fixture(scope="module")
def fit_folder(tmp_path_factory) -> Path:
    """A random model that likes media, saved the way `mio fit` saves (tokenizer specs recorded)."""
    return save_media_model(tmp_path_factory.mktemp("fit") / "model", seed=11, image_bias=4.0, speech_bias=4.0)


def test_cli_writes_transcript_with_decoded_images_and_audio(fit_folder, tmp_path, capsys):
    out = tmp_path / "answer"
    rc = generate_main(["--model", str(fit_folder), "--prompt", "Look at {image} and listen:", "--image", str(CAT),
                        "--speech", str(CLIP), "--video", str(VIDEO), "--out", str(out), "--max-new-tokens", "160",
                        "--steps", "1",
                        "--max-speech-frames", "3", "--set", "text.num_beams=1", "--set", "text.do_sample=true",
                        "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"transcript: {out / 'transcript.md'}"
    record = json.loads((out / "generation.json").read_text())
    kinds = [a["kind"] for a in record["answer"]]
    # The answer is printed too: its text, and the path of every media file.
    for a in record["answer"]:
        if a["file"]:
            assert any(f"[{a['kind']}: {out / a['file']}" in line for line in printed), (a, printed)
        elif a["kind"] == "text" and a["text"].strip():
            assert a["text"].strip().splitlines()[0] in "\n".join(printed)
    assert "image" in kinds and "speech" in kinds, kinds
    for a in record["answer"]:
        if a["kind"] in ("image", "speech", "video"):
            assert a["file"] and (out / a["file"]).stat().st_size > 0, a["note"]
    html = (out / "transcript.html").read_text()
    assert html.count("<audio controls") == 1 + kinds.count("speech") and '<img src="image_1.png"' in html
    assert '<video controls loop autoplay muted src="prompt/3_cafe.mp4"' in html
    prompt = np.asarray(record["prompt_ids"])
    begins = np.flatnonzero(prompt == VocabTable.mio_default(len(text_tokenizer())).image_begin)
    assert len(begins) == 5 and np.all(np.diff(begins[1:]) == 34)  # the photo, then the video's 4 key frames back to back
    md = (out / "transcript.md").read_text()
    assert "![image: cat.jpg](prompt/1_cat.jpg)" in md and "(speech_1.wav)" in md
    assert record["settings"]["speech"]["repetition_penalty"] == 1.15 and record["settings"]["text"]["num_beams"] == 1
    # The prompt: the image where {image} stood, the clip after the text.
    items = prompt_items("Look at {image} and listen:", [MediaFile("image", CAT), MediaFile("speech", CLIP)])
    assert [type(i).__name__ for i in items] == ["Text", "MediaFile", "Text", "MediaFile"]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = generate_main(args)
    return rc, capsys.readouterr().err


def test_bad_input_gives_clear_errors(fit_folder, tiny_base, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    model = ["--model", str(fit_folder)]
    rc, err = run_cli([*model, "--prompt", "hi", "--image", str(tmp_path / "missing.jpg"), *out], capsys)
    assert rc == 2 and "missing.jpg does not exist" in err
    rc, err = run_cli([*model, "--prompt", "hi", "--image", str(CLIP), *out], capsys)
    assert rc == 2 and "clip01.wav" in err and "says speech" in err
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    rc, err = run_cli([*model, "--prompt", "hi", "--image", str(fake), *out], capsys)
    assert rc == 2 and "notes.png cannot be decoded" in err
    rc, err = run_cli(["--model", str(tiny_base), "--prompt", "hi", *out], capsys)  # never extended
    assert rc == 2 and "not extended" in err
    rc, err = run_cli(["--model", str(tmp_path / "nope"), "--prompt", "hi", *out], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = run_cli([*model, "--prompt", "hi", "--outputs", "text,smell", *out], capsys)
    assert rc == 2 and "unknown output modality" in err
    rc, err = run_cli([*model, "--prompt", "hi", "--set", "text.beams=3", *out], capsys)
    assert rc == 2 and "unknown field 'beams'" in err
    rc, err = run_cli([*model, "--prompt", "hi", "--unclip", str(tmp_path), *out], capsys)
    assert rc == 2 and "model_index.json" in err
    rc, err = run_cli([*model, "--prompt", "{image} and {image}", "--image", str(CAT), *out], capsys)
    assert rc == 2 and "more {image} placeholders" in err
    rc, err = run_cli([*model, *out], capsys)
    assert rc == 2 and "nothing to generate from" in err
    with pytest.raises(ValueError, match="cannot tell"):
        MediaFile.guess(tmp_path / "data.bin")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unclip_of_the_wrong_size_is_reported_not_raised(fit_folder, tmp_path):
    """A detokenizer that cannot work turns into a reported segment, the transcript is written."""
    from mio.generate.detok import TinyUnclipConfig, tiny_unclip_pipeline

    wrong = tmp_path / "unclip16"
    tiny_unclip_pipeline(TinyUnclipConfig(embed_dim=16)).save_pretrained(wrong)
    gen = Generator(fit_folder, unclip=wrong, device="cpu")
    g = gen.generate("Please generate an image of a cat: <image>", chat=False, max_new_tokens=33)
    md = gen.write(g, tmp_path / "o").transcript.read_text()
    assert "not decoded: MioUserError" in md and "16-d" in md
    assert isinstance(g.segments[0], Image) and not isinstance(g.segments[0], Text)
