"""`mio generate` end to end, loading MIO's release layout, and bad input.

A model folder as `mio fit` leaves it (tokenizer specs recorded) needs no flag but --model to
decode its answer; MIO's layout (no table file, no specs) is read from the tokenizer's added
tokens and decodes with --tokenizers pointing at MIO's checkpoint tree.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mio.generate.cli import generate_main, prompt_items
from mio.generate.generator import Generator
from mio.generate.media import MediaFile
from mio.tokenizers.media_tokenizers import MIO_SPEECH_DIR, MIO_UNCLIP_DIR
from mio.segments import Image, Speech, Text
from mio.vocab import MIO_SPECIAL_ORDER, VocabTable

from test_generate_support import (SAMPLES, TINY_SEED, TINY_SPEECH, one_thread, save_media_model,  # noqa: F401
                                   text_tokenizer, tiny_media, tiny_unclip)

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
                        "--speech", str(CLIP), "--video", str(VIDEO), "--out", str(out), "--max-new-tokens", "160", "--steps", "1",
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


def mio_layout_folder(out: Path) -> tuple[Path, int]:
    """A tiny model and tokenizer laid out exactly as MIO's release: the text vocabulary, then
    the 6 specials at V..V+5, then <img0..8191>, then <spch0..4095>; no mio files beside them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(text_tokenizer())
    v = len(tok)
    tok.add_tokens(list(MIO_SPECIAL_ORDER) + [f"<img{i}>" for i in range(8192)] + [f"<spch{i}>" for i in range(4096)])
    assert tok.convert_tokens_to_ids(["<speech_placeholder>", "</spch>", "<image_placeholder>", "<spch>", "</image>",
                                      "<image>", "<img0>", "<spch0>"]) == [v, v + 1, v + 2, v + 3, v + 4, v + 5, v + 6, v + 6 + 8192]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, v


def mio_tree(out: Path) -> Path:
    """MIO's checkpoint tree with tiny weights: SpeechTokenizer/, stable-diffusion-2-1-unclip/,
    and (no tiny SEED in MIO's file format) a SEED spec file beside them."""
    codec = tiny_media().get("speech")
    (out / MIO_SPEECH_DIR).mkdir(parents=True)
    import yaml

    config = yaml.safe_load(TINY_SPEECH.read_text())["model"]
    (out / MIO_SPEECH_DIR / "config.json").write_text(json.dumps(config))
    torch.save(codec.model.state_dict(), out / MIO_SPEECH_DIR / "SpeechTokenizer.pt")
    tiny_unclip().save_pretrained(out / MIO_UNCLIP_DIR)
    shutil.copyfile(TINY_SEED, out / "seed.yaml")
    return out


def test_loading_mio_release_layout(tmp_path):
    folder, v = mio_layout_folder(tmp_path / "MIO-7B-Instruct")
    tree = mio_tree(tmp_path / "MIO")
    gen = Generator(folder, tokenizers=tree, device="cpu")
    assert gen.table.to_dict() == VocabTable.mio_default(v).to_dict()
    assert gen.tokenizer.convert_tokens_to_ids("<|im_end|>") in gen.stop_ids  # a chat answer ends at ChatML's turn end
    g = gen.generate("Please generate a speech of hello: <spch>", chat=False, max_new_tokens=20, max_speech_frames=3)
    speech = next(s for s in g.segments if isinstance(s, Speech))
    gen.write(g, tmp_path / "speech")
    wave, sr = sf.read(tmp_path / "speech" / "speech_1.wav", dtype="float32")
    reference = tiny_media().get("speech").decode(speech.codes)  # the weights the tree was saved from
    assert sr == 16000 and np.abs(wave - np.clip(reference, -1, 1)).max() < 2 / 32768
    g = gen.generate("Please generate an image of a cat: <image>", chat=False, max_new_tokens=33)
    assert isinstance(g.segments[0], Image)
    gen.write(g, tmp_path / "image")
    record = json.loads((tmp_path / "image" / "generation.json").read_text())
    assert record["summary"]["image_decoder"] == str(tree / MIO_UNCLIP_DIR)
    assert (tmp_path / "image" / "image_1.png").is_file()
    # Without --tokenizers MIO's folder still generates; its media are reported, not decoded.
    bare = Generator(folder, device="cpu")
    g = bare.generate("Please generate a speech of hello: <spch>", chat=False, max_new_tokens=20, max_speech_frames=3)
    md = bare.write(g, tmp_path / "bare").transcript.read_text()
    assert "not decoded" in md and "--tokenizers" in md


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
    assert "not decoded: ValueError" in md and "16-d" in md
    assert isinstance(g.segments[0], Image) and not isinstance(g.segments[0], Text)
