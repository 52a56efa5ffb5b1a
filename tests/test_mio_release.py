"""MIO's released checkpoints as a starting point, on a tiny copy of the release's own layout
(tests/mio_release.py): read without guessed names, its tokenizer subfolders found in the model
folder, `mio generate` with both presets (text, image and speech answers), the release's prompt
syntax and long speech prompts, `mio fit` continuing pretraining with the release's templates,
and a LoRA SFT whose adapter loads in plain peft."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from mio_release import RELEASE_SPECIALS, build_release
from test_generate_support import SAMPLES, one_thread, tiny_media  # noqa: F401 (autouse fixture)
from train_support import shared_root, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from mio.generate.cli import generate_main
from mio.generate.detok import load_unclip_pipeline
from mio.generate.generator import Generator
from mio.generate.media import MediaFile
from mio.generate.prompt import prompt_items
from mio.generate.settings import PRESETS
from mio.segments import Image, Speech, Text
from mio.tokenizers.media_tokenizers import MIO_SEED_DIR, MIO_UNCLIP_DIR, MediaTokenizers
from mio.train.cli import fit
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO, VocabTable, folder_table

CAT = SAMPLES / "images" / "cat.jpg"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    """(MIO's folder as released, a folder with a tiny SEED spec reading its SEED files)."""
    return build_release(tmp_path_factory.mktemp("release") / "MIO-7B-Instruct")


def test_the_layout_is_read_from_what_the_release_states(release):
    folder, _ = release
    config = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    table = folder_table(folder, tok)
    assert (table.text_size, table.speech_end, table.speech_begin, table.image_end, table.image_begin) == \
        (config["text_vocab_size"], config["speech_eos_id"], config["speech_bos_id"], config["image_eos_id"],
         config["image_bos_id"])
    assert table.total_size == config["vocab_size"] and table.image_start == config["text_vocab_size"] + 6
    assert tok.convert_tokens_to_ids(["<img0>", "<spch1024>"]) == [table.image_start, table.speech_start + 1024]
    # The placeholders keep the tokenizer's own names (not mio's); nothing needs them.
    assert {table.specials[RELEASE_SPECIALS[0]], table.specials[RELEASE_SPECIALS[2]]} == \
        {config["speech_placeholder_id"], config["image_placeholder_id"]}
    # The tokenizer subfolders are found in the model folder itself, with no --tokenizers.
    media = MediaTokenizers.for_model(folder)
    assert media.specs[IMAGE].spec == {"kind": "seed", "root": str(folder), "quantizer": f"{MIO_SEED_DIR}/seed_quantizer.pt",
                                       "vit": f"{MIO_SEED_DIR}/eva_vit_g.pth"}  # the release's SEED architecture
    assert media.unclip == folder / MIO_UNCLIP_DIR and media.specs[VIDEO].spec["selection"] == "mio-release"
    pipe = load_unclip_pipeline(folder / MIO_UNCLIP_DIR, torch.device("cpu"), torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16  # the dtype asked, not diffusers' default
    speech = tiny_media().get(SPEECH)
    codes = speech.encode([speech.load_audio(SAMPLES / "speech" / "clip01.wav")])[0]
    np.testing.assert_array_equal(media.get(SPEECH).decode(codes), speech.decode(codes))


def test_release_prompt_syntax():
    a, b, s = MediaFile(IMAGE, Path("a.jpg")), MediaFile(IMAGE, Path("b.jpg")), MediaFile(SPEECH, Path("s.wav"))
    items = prompt_items("<image_placeholder_1> then <image_placeholder_0>, hear <speech_placeholder_0>", [a, b, s])
    assert items == [b, Text(" then "), a, Text(", hear "), s]
    assert prompt_items("{image} and <image_placeholder_0>", [a, b]) == [a, Text(" and "), a, b]  # b: not named
    with pytest.raises(ValueError, match="names <image_placeholder_2> but only 2 image file"):
        prompt_items("<image_placeholder_2>", [a, b])


@pytest.mark.slow
def test_generate_answers_with_both_presets(release, tmp_path, capsys):
    folder, seed_spec = release
    # CLI, paper preset: an image answer; the unCLIP pipeline comes from the model folder.
    out = tmp_path / "image"
    rc = generate_main(["--model", str(folder), "--tokenizers", str(seed_spec), "--prompt", "Please draw a cat.",
                        "--outputs", "image", "--max-new-tokens", "40", "--steps", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    record = json.loads((out / "generation.json").read_text())
    assert record["summary"]["preset"] == "paper" and record["summary"]["image_decoder"] == str(folder / MIO_UNCLIP_DIR)
    images = [a for a in record["answer"] if a["kind"] == IMAGE]
    assert images and all((out / a["file"]).stat().st_size > 0 for a in images)
    assert f"[image: {out / images[0]['file']}" in printed and f"transcript: {out / 'transcript.md'}" in printed
    # CLI, release preset: speech to speech, a 16 s prompt (over the 15 s pretraining filter) in MIO's syntax.
    long = tmp_path / "long.wav"
    wave, rate = sf.read(SAMPLES / "speech" / "clip01.wav", dtype="float32")
    sf.write(long, np.resize(wave, 16 * rate), rate)
    out = tmp_path / "speech"
    rc = generate_main(["--model", str(folder), "--preset", "mio-release", "--prompt", "<speech_placeholder_0>",
                        "--speech", str(long), "--outputs", "speech", "--max-speech-frames", "3",
                        "--max-new-tokens", "30", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "generation.json").read_text())
    s = record["settings"][SPEECH]
    assert (s["num_beams"], s["do_sample"], s["repetition_penalty"]) == (5, False, 1.15)  # the release's speech-to-speech
    table = VocabTable.from_tokenizer(AutoTokenizer.from_pretrained(folder), json.loads((folder / "config.json").read_text()))
    prompt = np.asarray(record["prompt_ids"])
    assert table.is_speech(prompt).sum() == 16 * 50  # the whole clip's content codes
    kinds = [a["kind"] for a in record["answer"]]
    assert SPEECH in kinds and set(kinds) <= {SPEECH, "partial"}  # speech only (the limit may cut the last block)
    assert all((out / a["file"]).stat().st_size > 0 for a in record["answer"] if a["kind"] == SPEECH)
    # Python API over one loaded model: the other answers of both presets.
    gen = Generator(folder, tokenizers=seed_spec, device="cpu")
    im_end = gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = gen.generate("Say hello.", preset="mio-release", outputs=[TEXT], max_new_tokens=6)
    assert gen.stop_ids_for(PRESETS["mio-release"], chat=True) == [im_end]
    assert all(isinstance(x, Text) for x in text.segments) and text.settings[TEXT].num_beams == 5
    paper_text = gen.generate("Say hello.", outputs=[TEXT], max_new_tokens=6)
    assert all(isinstance(x, Text) for x in paper_text.segments) and paper_text.preset == "paper"
    speech = gen.generate("Say hello.", task="tts", outputs=[SPEECH], max_new_tokens=20, max_speech_frames=3)
    assert speech.segments and all(isinstance(x, Speech) for x in speech.segments)
    image = gen.generate("Please generate an image according to the caption.\na cat", preset="mio-release",
                         outputs=[IMAGE], max_new_tokens=35)
    assert isinstance(image.segments[0], Image) and image.settings[IMAGE].num_beams == 5  # beams inside the block
    assert image.settings[IMAGE].repetition_penalty == 1.15
    written = gen.write(image, tmp_path / "api-image")
    assert (written.transcript.parent / "image_1.png").is_file()


@pytest.mark.slow
def test_fit_continues_pretraining_and_lora_sft_from_the_release(release, tmp_path_factory):
    from peft import PeftModel

    folder, _ = release
    root = shared_root(tmp_path_factory)
    runs = tmp_path_factory.mktemp("release-runs")
    out = fit(tiny_args(root, runs / "continued", f"--model.backbone={folder}", "--model.extend_vocab=false",
                        "--data.templates=mio-release", steps=2))
    tok = AutoTokenizer.from_pretrained(folder)
    assert VocabTable.load(out) == folder_table(folder, tok)
    assert "templates: mio-release" in (out / "mio_stage_config.yaml").read_text()
    adapter = fit(tiny_args(root, runs / "lora", f"--model.backbone={folder}", "--data.datasets=[{path: sft, format: sft}]",
                            config="4_sft_lora.yaml", steps=2))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    # Plain transformers + peft, no mio code: the adapter loads and changes the model.
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    table = folder_table(folder, tok)
    ids = torch.tensor([[1, 5, 9, table.image_begin, table.image_start + 7, table.image_end, table.speech_begin,
                         table.speech_start + 1030, table.speech_end, 7]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_template_sets_paper_and_mio_release():
    """`paper` keeps the paper's wording; `mio-release` quotes captions ``...'' and uses the
    release's SFT instructions for TTS, image and video generation; a stage chooses one."""
    from mio.data.reading import DatasetSpec
    from mio.templates import (
        MIO_RELEASE,
        PAIR_TASKS,
        PAPER,
        PRETRAIN_TEMPLATES,
        fill_template,
        pair_conversation,
        template_set,
    )
    from mio.train.data import MioDataModule

    assert PAPER.pretrain == PRETRAIN_TEMPLATES and PAPER.pair_tasks == PAIR_TASKS
    img, spch = Image(np.zeros(32, dtype=np.int64)), Speech(np.zeros((4, 3), dtype=np.int64))
    def words(segments):
        return "".join(x.text if isinstance(x, Text) else f"[{type(x).__name__}]" for x in segments)

    assert words(fill_template(MIO_RELEASE.pretrain["image_generation"], "a cat", img)) == \
        "Please generate an image of ``a cat'': [Image]"
    assert words(fill_template(MIO_RELEASE.pretrain["tts"], "hi", spch)) == "Please generate a speech of ``hi'': [Speech]"
    tts = pair_conversation("tts", spch, "Good morning", MIO_RELEASE)
    assert tts[0].content == [Text("The transcription is ``Good morning''. Please generate a speech according to the "
                                   "given transcription. Start with <spch>.")] and tts[1].content == [spch]
    assert pair_conversation("descriptive_image_generation", img, "A tree.", MIO_RELEASE)[0].content == \
        [Text("Please generate an image according to the caption.\nA tree.")]
    assert pair_conversation("video_generation", img, "rush hour", MIO_RELEASE)[0].content == \
        [Text("Please generate a video for ``rush hour''")]
    for task in ("image_captioning", "asr"):  # the paper set already has the release's own wording
        assert pair_conversation(task, img, "x", MIO_RELEASE)[0].content == pair_conversation(task, img, "x")[0].content
    data = MioDataModule([DatasetSpec("a"), DatasetSpec("b", format="sft", tasks=["tts"])], templates="mio-release")
    assert [d.templates for d in data.datasets] == ["mio-release", "mio-release"]
    with pytest.raises(ValueError, match="unknown template set 'latex'"):
        template_set("latex")
    with pytest.raises(ValueError, match="set data.templates for the whole stage"):
        MioDataModule([DatasetSpec("a", templates="mio-release")], templates="paper")


def test_prompts_are_the_ids_the_release_gives(release):
    """On the release's SentencePiece tokenizer, a chat prompt with an image and speech renders to
    exactly the ids MIO's own code gives: its ChatML string, media written as token strings
    (speech input as content codes), tokenized whole (MIO's tokenization_mio.py)."""
    from mio.templates import SYSTEM_SPEECH, SYSTEM_STANDARD

    folder, _ = release
    gen = Generator(folder, device="cpu")
    rng = np.random.default_rng(0)
    image, speech = rng.integers(0, 8192, 32), rng.integers(0, 1024, (4, 5))

    def mio_string(system: str, query: str) -> str:  # MIO_CHAT_TEMPLATE, add_generation_prompt
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n"
                "<|im_start|>assistant\n")

    image_str = "<image>" + "".join(f"<img{c}>" for c in image) + "</image>"
    speech_str = "<spch>" + "".join(f"<spch{c}>" for c in speech[0]) + "</spch>"  # input: the content layer
    g = gen.generate(["What is in  this picture?\n", Image(image), " And this: ", Speech(speech)], max_new_tokens=1,
                     settings={"all": {"num_beams": 1, "do_sample": False}})
    want = gen.tokenizer(mio_string(SYSTEM_STANDARD, f"What is in  this picture?\n{image_str} And this: {speech_str}"))
    assert g.prompt_ids.tolist() == want["input_ids"]
    tts = "The transcription is ``Good morning''. Please generate a speech according to the given transcription. " \
          "Start with <spch>."
    g = gen.generate(tts, task="tts", max_new_tokens=1, settings={"all": {"num_beams": 1, "do_sample": False}})
    assert g.prompt_ids.tolist() == gen.tokenizer(mio_string(SYSTEM_SPEECH, tts))["input_ids"]
