"""The generation loop and the Generator API.

- with one setting for every modality the loop is transformers' generate with the constraint,
  token for token (greedy, sampling, beam search; with and without the KV cache);
- Table 8's settings switch exactly at block boundaries;
- property: for any random model and settings, every answer parses, re-renders to its own ids
  and decodes (images, speech, video) -- or ends in one reported, undecoded partial block.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_generate_support import SAMPLES, media_model, one_thread, tiny_media  # noqa: F401 (autouse fixture)

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import LENGTH, STOP, Decoder
from mio.generate.detok import UnclipSettings
from mio.generate.generator import Generator
from mio.generate.media import MediaFile
from mio.generate.settings import MODES, TABLE8, DecodeSettings, get_preset, resolve_settings
from mio.segments import Image, SegmentRenderer, Speech, Text, Video
from mio.templates import Turn
from mio.tokenizers.media_tokenizers import MediaTokenizers
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO

ONE_STEP = UnclipSettings(steps=1)


def uniform(s: DecodeSettings) -> dict[str, DecodeSettings]:
    return {m: s for m in MODES}


def hf_generate(model, prompt: list[int], c: ModalityConstraint, s: DecodeSettings, n: int, cache: bool, seed: int) -> list[int]:
    torch.manual_seed(seed)  # transformers samples from the global generator
    stop = model.generation_config.eos_token_id
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, logits_processor=[c], eos_token_id=stop,
                         pad_token_id=stop[0], use_cache=cache, **s.generate_kwargs())
    return out[0, len(prompt):].tolist()


def same_as_hf(ours: list[int], hf: list[int], pad: int) -> bool:
    """transformers pads a finished beam result to the longest; the pad is EOS here."""
    return ours == hf[:len(ours)] and all(t == pad for t in hf[len(ours):])


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("name,s", [
    ("greedy", DecodeSettings(do_sample=False)),
    ("sampling", DecodeSettings(top_p=0.7, top_k=50, temperature=0.8, repetition_penalty=1.15)),
])
def test_loop_equals_transformers_generate(name, s, cache):
    model, tok, table = media_model(seed=1, image_bias=3.0, speech_bias=3.0)
    c = ModalityConstraint(table, max_speech_frames=4)
    prompt = [tok.bos_token_id, *tok("a cat")["input_ids"]]
    for seed, first in ((0, []), (1, [table.image_begin]), (2, [table.speech_begin])):
        ours = Decoder(model, c, uniform(s), model.generation_config.eos_token_id, use_cache=cache)
        r = ours.run(prompt + first, 48, seed=seed)
        assert r.ids == hf_generate(model, prompt + first, c, s, 48, cache, seed)[:len(r.ids)]
        assert len(r.ids) == 48 or r.stopped == STOP


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_text_beam_search_equals_transformers(cache, early_stopping):
    """Beams, hypotheses, length penalty and the stopping rule as transformers has them; the
    stop-token bias makes beams finish early, late, or never."""
    lengths = set()
    for stop_bias, length_penalty in ((0.0, 1.0), (2.0, 1.0), (4.0, 0.5)):
        model, tok, table = media_model(seed=1, stop_bias=stop_bias, scale=30.0)
        c = ModalityConstraint(table, allow_image=False, allow_speech=False)
        s = DecodeSettings(num_beams=3, do_sample=False, early_stopping=early_stopping, length_penalty=length_penalty)
        prompt = [tok.bos_token_id, *tok("a cat")["input_ids"]]
        r = Decoder(model, c, {TEXT: s}, model.generation_config.eos_token_id, use_cache=cache).run(prompt, 40)
        assert same_as_hf(r.ids, hf_generate(model, prompt, c, s, 40, cache, 0), tok.pad_token_id)
        lengths.add((r.stopped, len(r.ids)))
    assert {stopped for stopped, _ in lengths} == {STOP, LENGTH}


def test_beam_search_through_media_blocks_equals_transformers(cache=True):
    """One beam setting for every modality (MIO's release for image and speech generation): the
    whole answer is one beam search under the constraint, transformers' own, token for token,
    through the image and speech blocks."""
    model, tok, table = media_model(seed=3, image_bias=4.0, speech_bias=4.0)
    c = ModalityConstraint(table, max_speech_frames=3)
    s = DecodeSettings(num_beams=3, do_sample=False, repetition_penalty=1.15)
    prompt = [tok.bos_token_id, *tok("a cat")["input_ids"]]
    seen = set()
    for first in ([], [table.image_begin], [table.speech_begin]):
        r = Decoder(model, c, uniform(s), model.generation_config.eos_token_id, use_cache=cache).run(prompt + first, 60)
        assert same_as_hf(r.ids, hf_generate(model, prompt + first, c, s, 60, cache, 0), tok.pad_token_id)
        assert r.beam_phases == 1 and r.modes == expected_modes(prompt + first, r.ids, c)
        seen |= set(r.modes)
    assert {IMAGE, SPEECH} <= seen


def test_beam_phases_per_modality_keep_the_grammar():
    """Different beam settings per modality: each block is its own beam search, ended by the
    token that leaves it; the answer parses and re-renders to its ids."""
    model, tok, table = media_model(seed=4, image_bias=5.0, speech_bias=4.0)
    gen = Generator.from_loaded(model, tok, table)
    beams = {TEXT: {"num_beams": 2}, IMAGE: {"num_beams": 3}, VIDEO: {"num_beams": 2}, SPEECH: {"num_beams": 2}}
    g = gen.generate("a cat", chat=False, settings=beams, max_new_tokens=150, max_speech_frames=3)
    c = ModalityConstraint(table)
    assert g.result.modes == expected_modes(list(g.prompt_ids), g.result.ids, c)
    media = [x for x in g.segments if not isinstance(x, Text)]
    assert media and g.result.beam_phases >= 2 * len(media)  # a phase for each block and the text after it
    ids = g.result.ids[:-1] if g.stopped == STOP else g.result.ids
    if g.partial is None:
        assert SegmentRenderer(tok, table)(g.segments).input_ids.tolist() == [tok.bos_token_id, *ids]


def test_presets_paper_and_mio_release():
    from mio.generate.settings import PRESETS

    paper, release = PRESETS["paper"], PRESETS["mio-release"]
    assert paper.settings(paper.task_of("tts", None, False)) == TABLE8 and paper.max_new_tokens == 1024
    want = {"text": (5, False, 1.0, 1.0), "image_generation": (5, False, 1.0, 1.15), "tts": (1, True, 0.7, 1.15),
            "speech_generation": (5, False, 1.0, 2.0), "speech_to_speech": (5, False, 1.0, 1.15),
            "video_generation": (1, True, 0.7, 1.15), "interleaved": (1, True, 0.7, 1.15)}
    for task, (beams, sample, top_p, penalty) in want.items():
        modes = release.settings(task)
        assert len(set(modes.values())) == 1 and set(modes) == set(MODES)  # one setting for the whole answer
        s = modes[TEXT]
        assert (s.num_beams, s.do_sample, s.top_p, s.repetition_penalty, s.top_k, s.length_penalty) == \
            (beams, sample, top_p, penalty, 0, 1.0), task
    assert release.max_new_tokens == 512
    assert release.task_of(None, None, False) == "text"
    assert release.task_of(None, ["speech"], False) == "speech_generation"
    assert release.task_of(None, ["speech"], True) == "speech_to_speech"
    assert release.task_of(None, ["image"], False) == "image_generation"
    assert release.task_of(None, ["text", "image"], False) == "interleaved"
    assert release.task_of("descriptive_image_generation", None, False) == "image_generation"
    with pytest.raises(ValueError, match="no settings for task 'poetry'"):
        release.task_of("poetry", None, False)


def test_mio_release_stops_where_the_release_does():
    """Chat answers end at <|im_end|> only, raw ones at EOS only (MIO's infer.py: id 7 for
    Instruct, EOS for Base); the paper preset stops at either."""
    model, tok, table = media_model(seed=8, image_bias=-9.0, speech_bias=-9.0)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.bias[im_end] += 12.0  # the model wants to end its turn at once
    gen = Generator.from_loaded(model, tok, table)
    text1 = {"all": {"num_beams": 1, "do_sample": False}}
    assert gen.stop_ids_for(get_preset("mio-release"), chat=True) == [im_end]
    assert gen.stop_ids_for(get_preset("mio-release"), chat=False) == [tok.eos_token_id]
    paper = gen.generate("hi", chat=False, settings=text1, max_new_tokens=6)
    assert paper.stopped == STOP and paper.result.ids == [im_end]
    release = gen.generate("hi", chat=False, preset="mio-release", settings=text1, max_new_tokens=6)
    assert release.stopped == LENGTH and release.result.ids[0] == im_end and release.preset == "mio-release"
    chat = gen.generate("hi", preset="mio-release", settings=text1, max_new_tokens=6)
    assert chat.stopped == STOP and chat.result.ids == [im_end]


def test_media_only_outputs_give_an_answer_of_media():
    """--outputs speech: the answer is speech blocks and the stop token, never text."""
    model, tok, table = media_model(seed=9, image_bias=6.0, speech_bias=0.0, stop_bias=2.0)
    gen = Generator.from_loaded(model, tok, table)
    for seed in range(3):
        g = gen.generate("Say hello.", outputs=[SPEECH], settings={"all": {"num_beams": 1}}, max_new_tokens=40,
                         max_speech_frames=2, seed=seed)
        text = [i for i in g.result.ids if i < table.text_size and i not in gen.stop_ids]
        assert text == [] and g.result.ids[0] == table.speech_begin
        assert g.segments and all(isinstance(x, Speech) for x in g.segments)


def test_max_new_tokens_is_bounded_by_positions_and_buffers_by_tokens_made():
    """100,000,000 new tokens asked: the limit is capped at the positions (and said), and no
    buffer is sized by the number asked."""
    import tracemalloc

    model, tok, table = media_model(seed=10, image_bias=-9.0, speech_bias=-9.0)
    gen = Generator.from_loaded(model, tok, table)
    text1 = {"all": {"num_beams": 1, "do_sample": False}}
    prompt_len = len(gen.generate("hi", chat=False, settings=text1, max_new_tokens=1).prompt_ids)
    model.config.max_position_embeddings = prompt_len + 7
    g = gen.generate("hi", chat=False, settings=text1, max_new_tokens=100_000_000)
    assert len(g.result.ids) <= 7 and g.result.notes == [
        f"max_new_tokens 100000000 capped at 7: the prompt has {prompt_len} tokens and the model's positions "
        f"allow {prompt_len + 7} (max_position_embeddings)"]
    model.config.max_position_embeddings = prompt_len
    with pytest.raises(ValueError, match="shorten the prompt"):
        gen.generate("hi", chat=False, settings=text1)
    del model.config.max_position_embeddings  # a model without a position limit: memory follows the tokens made
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] += 20.0
    tracemalloc.start()
    g = gen.generate("hi", chat=False, settings=text1, max_new_tokens=100_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert g.stopped == STOP and peak < 20_000_000


def expected_modes(prompt: list[int], ids: list[int], c: ModalityConstraint) -> list[str]:
    """The settings each new token should have been chosen with, from the ids alone."""
    t, out, seq = c.table, [], list(prompt)
    for tok in ids:
        mode, inside = TEXT, None
        for i in range(len(seq) - 1, -1, -1):  # innermost open block, walking back
            if seq[i] in (t.image_end, t.speech_end):
                break
            if seq[i] in (t.image_begin, t.speech_begin):
                inside = i
                break
        if inside is not None and seq[inside] == t.image_begin:
            mode = VIDEO if inside > 0 and seq[inside - 1] == t.image_end else IMAGE
        elif inside is not None:
            mode = SPEECH
        out.append(mode)
        seq.append(tok)
    return out


def test_settings_switch_at_block_boundaries():
    model, tok, table = media_model(seed=4, image_bias=5.0, speech_bias=4.0)
    gen = Generator.from_loaded(model, tok, table)
    text3 = {TEXT: {"num_beams": 3}}
    a = gen.generate("a cat", chat=False, settings=text3, max_new_tokens=150, max_speech_frames=3)
    kinds = {type(s) for s in a.segments}
    assert Image in kinds or Video in kinds
    prompt = list(a.prompt_ids)
    assert a.result.modes == expected_modes(prompt, a.result.ids, ModalityConstraint(table))
    assert a.result.beam_phases >= 2  # text resumed after a block, in a new beam phase
    # Other image settings change the image codes and nothing before them.
    b = gen.generate("a cat", chat=False, settings={**text3, IMAGE: {"do_sample": False}}, max_new_tokens=150,
                     max_speech_frames=3)
    first_image = a.result.modes.index(IMAGE)
    assert b.result.ids[:first_image] == a.result.ids[:first_image]
    assert b.result.ids[first_image:first_image + 32] != a.result.ids[first_image:first_image + 32]


def test_table8_defaults_and_overrides():
    assert TABLE8[TEXT].num_beams == 5 and not TABLE8[TEXT].do_sample
    for m in (IMAGE, SPEECH, VIDEO):
        assert TABLE8[m].do_sample and TABLE8[m].top_p == 0.7 and TABLE8[m].num_beams == 1
    penalties = (TABLE8[IMAGE].repetition_penalty, TABLE8[SPEECH].repetition_penalty, TABLE8[VIDEO].repetition_penalty)
    assert penalties == (1.0, 1.15, 1.15)
    s = resolve_settings({"all": {"temperature": 0.5}, SPEECH: {"repetition_penalty": 2.0}})
    assert s[TEXT].temperature == 0.5 and s[SPEECH].repetition_penalty == 2.0 and s[SPEECH].top_p == 0.7
    assert resolve_settings({IMAGE: {"num_beams": 2}})[IMAGE] == DecodeSettings(num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="unknown decoding setting"):
        resolve_settings({TEXT: {"beams": 2}})
    with pytest.raises(ValueError, match="unknown modality"):
        resolve_settings({"audio": {"top_p": 0.5}})


PROMPTS = ("chat", "raw_text", "raw_open_image", "raw_open_speech", "chat_literal_spch")


def build_prompt(kind: str, table) -> tuple[object, bool]:
    if kind == "chat":
        return "Please generate an image of a cat", True
    if kind == "chat_literal_spch":
        return "Read this aloud. Start with <spch>.", True  # MIO's own TTS wording: a literal mention
    if kind == "raw_open_image":
        return "Please generate an image of a cat: <image>", False
    if kind == "raw_open_speech":
        return "Please generate a speech of hello: <spch>", False
    return "a cat sitting on a mat", False


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), image_bias=st.floats(-2, 8), speech_bias=st.floats(-2, 8),
       stop_bias=st.floats(-2, 4), beams=st.integers(1, 3), text_sample=st.booleans(),
       top_p=st.floats(0.05, 1.0), penalty=st.floats(0.8, 1.6), max_new=st.integers(1, 140),
       cache=st.booleans(), prompt_kind=st.sampled_from(PROMPTS), media_beams=st.integers(1, 2))
def test_property_every_answer_parses_and_decodes(seed, image_bias, speech_bias, stop_bias, beams, text_sample,
                                                   top_p, penalty, max_new, cache, prompt_kind, media_beams):
    model, tok, table = media_model(seed=seed, image_bias=image_bias, speech_bias=speech_bias, stop_bias=stop_bias)
    gen = Generator.from_loaded(model, tok, table, tiny_media())
    text = {"num_beams": beams, "do_sample": text_sample and beams == 1}
    media = {"top_p": top_p, "repetition_penalty": penalty, "num_beams": media_beams, "do_sample": media_beams == 1}
    prompt, chat = build_prompt(prompt_kind, table)
    g = gen.generate(prompt, chat=chat, max_new_tokens=max_new, use_cache=cache, seed=seed, max_speech_frames=5,
                     settings={TEXT: text, IMAGE: media, SPEECH: media, VIDEO: media})
    for kind in sorted({type(x).__name__ for x in g.segments}) + (["partial"] if g.partial else []):
        event(f"answer has {kind}")
    assert len(g.result.ids) <= max_new
    assert g.partial is None or g.stopped == LENGTH
    # Round trip: the parsed answer renders back to exactly the ids it came from.
    ids = g.result.ids[:-1] if g.stopped == STOP else list(g.result.ids)
    if g.partial is not None:
        c = ModalityConstraint(table)
        start = c.state(np.concatenate([g.prompt_ids, np.asarray(ids, dtype=np.int64)])).start - len(g.prompt_ids)
        ids = ids[:max(start, 0)]
    rendered = SegmentRenderer(tok, table)(g.segments).input_ids.tolist()[1:]  # without the tokenizer's BOS
    opened = ModalityConstraint(table).state(g.prompt_ids)
    lead = g.prompt_ids[opened.start:].tolist() if opened.kind != TEXT and rendered else []
    assert _same_tokens(rendered, lead + ids, tok)
    for s in g.segments:
        if isinstance(s, Speech):
            assert s.codes.shape[0] == table.speech_layers and s.codes.shape[1] <= 5
    with tempfile.TemporaryDirectory() as out:
        decoded = gen.decode(g, out, ONE_STEP)
        for d in decoded:
            if d.kind in (IMAGE, SPEECH, VIDEO):
                assert d.file is not None and (Path(out) / d.file).stat().st_size > 0, d.note
        assert [d.kind for d in decoded if d.kind != "text"] == \
            [{Image: IMAGE, Speech: SPEECH, Video: VIDEO}[type(s)] for s in g.segments if not isinstance(s, Text)] \
            + (["partial"] if g.partial else [])


def _same_tokens(rendered: list[int], ids: list[int], tok) -> bool:
    """Media ids must match exactly; text may re-tokenize differently but must read the same."""
    if rendered == ids:
        return True
    return tok.decode(rendered) == tok.decode(ids)


def test_token_limit_inside_a_block_is_reported_not_decoded(tmp_path):
    model, tok, table = media_model(seed=2)
    gen = Generator.from_loaded(model, tok, table, tiny_media())
    g = gen.generate("Please generate an image of a cat: <image>", chat=False, max_new_tokens=5)
    assert g.stopped == LENGTH and g.segments == [] and g.partial.kind == IMAGE and g.partial.tokens == 5
    md = gen.write(g, tmp_path, ONE_STEP).transcript.read_text()
    assert "after 5 codes" in md and not list(tmp_path.glob("*.png"))
    record = json.loads((tmp_path / "generation.json").read_text())
    assert record["partial"]["tokens"] == 5 and record["answer"][-1]["kind"] == "partial"
    # A prompt that opens a block lends it to the answer: 33 tokens close the image.
    g = gen.generate("Please generate an image of a cat: <image>", chat=False, max_new_tokens=33)
    assert isinstance(g.segments[0], Image) and g.partial is None


def test_outputs_limit_modalities_and_missing_ones_are_refused():
    model, tok, table = media_model(seed=5, image_bias=8.0, speech_bias=8.0)
    gen = Generator.from_loaded(model, tok, table)
    g = gen.generate("a cat", chat=False, outputs=("text", SPEECH), max_new_tokens=40, max_speech_frames=2,
                     settings={TEXT: {"num_beams": 1}})
    assert not any(isinstance(s, (Image, Video)) for s in g.segments) and any(isinstance(s, Speech) for s in g.segments)
    with pytest.raises(ValueError, match="unknown output modality"):
        gen.generate("a cat", outputs=("smell",))
    # A model whose output layer stops before the speech codes has no speech to give.
    small, tok2, table2 = media_model(seed=5)
    small.resize_token_embeddings(table2.speech_start)
    gen2 = Generator.from_loaded(small, tok2, table2)
    with pytest.raises(ValueError, match="no speech code tokens"):
        gen2.generate("a cat", outputs=(SPEECH,))
    g2 = gen2.generate("a cat", chat=False, max_new_tokens=20, settings={TEXT: {"num_beams": 1}})
    assert not any(isinstance(s, Speech) for s in g2.segments)


def test_chat_prompt_with_media_files_and_turns(tmp_path):
    model, tok, table = media_model(seed=6)
    gen = Generator.from_loaded(model, tok, table, tiny_media())
    cat = SAMPLES / "images" / "cat.jpg"
    clip = sorted((SAMPLES / "speech").glob("*.wav"))[0]
    g = gen.generate(["Compare", MediaFile.guess(cat), "with", MediaFile.guess(clip)], max_new_tokens=4,
                     settings={TEXT: {"num_beams": 1}})
    ids = g.prompt_ids
    assert (ids == table.image_begin).sum() == 1 and (ids == table.speech_begin).sum() == 1
    # Input speech is the content layer only (MIO's convention for speech in a prompt).
    start, end = int(np.flatnonzero(ids == table.speech_begin)[0]), int(np.flatnonzero(ids == table.speech_end)[0])
    assert table.is_speech(ids[start + 1:end]).all() and (ids[start + 1:end] < table.speech_start + 1024).all()
    turns = [Turn("user", [Text("hi")]), Turn("assistant", [Text("hello")]), Turn("user", [Text("draw")])]
    g2 = gen.generate(turns, max_new_tokens=2, settings={TEXT: {"num_beams": 1}})
    assert tok.decode(g2.prompt_ids.tolist()).count("<|im_start|>") == 5  # system, 3 turns, generation prompt
    md = gen.write(g, tmp_path, ONE_STEP).transcript.read_text()
    assert "prompt/1_cat.jpg" in md and (tmp_path / "prompt" / "1_cat.jpg").is_file()
    html = (tmp_path / "transcript.html").read_text()
    assert '<img src="prompt/1_cat.jpg"' in html and "<audio controls" in html


def test_missing_detokenizer_is_a_reported_segment(tmp_path):
    """A model that knows no speech tokenizer still writes its transcript; the speech is
    reported as not decoded, with the reason."""
    model, tok, table = media_model(seed=7, speech_bias=9.0, image_bias=-9.0)
    gen = Generator.from_loaded(model, tok, table, MediaTokenizers({}))
    g = gen.generate("hello", chat=False, max_new_tokens=20, max_speech_frames=2, settings={TEXT: {"num_beams": 1}})
    assert any(isinstance(s, Speech) for s in g.segments)
    md = gen.write(g, tmp_path, ONE_STEP).transcript.read_text()
    assert "not decoded: MissingTokenizerError" in md and "--tokenizers" in md
    assert not list(tmp_path.glob("*.wav"))


@pytest.mark.gpu
def test_loop_on_cuda_equals_transformers_generate():
    model, tok, table = media_model(seed=1, image_bias=3.0, speech_bias=3.0)
    model = model.cuda()
    c = ModalityConstraint(table, max_speech_frames=4)
    prompt = [tok.bos_token_id, *tok("a cat")["input_ids"], table.image_begin]
    greedy = DecodeSettings(do_sample=False)
    r = Decoder(model, c, uniform(greedy), model.generation_config.eos_token_id).run(prompt, 48)
    stop = model.generation_config.eos_token_id
    hf = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=48, logits_processor=[c], eos_token_id=stop,
                        pad_token_id=stop[0], **greedy.generate_kwargs())[0, len(prompt):].tolist()
    assert r.ids == hf[:len(r.ids)]
    gen = Generator.from_loaded(model, tok, table, device="cuda")
    g = gen.generate("a cat", chat=False, max_new_tokens=60, max_speech_frames=3)
    assert g.partial is None or g.stopped == LENGTH
