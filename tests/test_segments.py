"""Segments <-> token ids: render/parse inverse (hypothesis), loss masks, templates, ChatML."""

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mio.segments import Image, ParseError, Speech, Text, TextEncoder, Video, canonical, parse, render
from mio.templates import (PRETRAIN_TEMPLATES, SYSTEM_SPEECH, SYSTEM_STANDARD, ConversationError, Turn,
                           fill_template, pair_conversation, pretrain_segments, render_chat)
from mio.vocab import VocabError, VocabTable

TEXT_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
texts = st.text(TEXT_ALPHABET, min_size=1, max_size=20).filter(lambda s: "<" not in s)
images = st.lists(st.integers(0, 8191), min_size=32, max_size=32).map(lambda c: Image(np.array(c)))
videos = st.integers(2, 4).flatmap(lambda f: st.lists(st.integers(0, 8191), min_size=32 * f, max_size=32 * f)
                                   .map(lambda c: Video(np.array(c).reshape(f, 32))))
speeches = st.tuples(st.sampled_from([1, 4]), st.integers(1, 12)).flatmap(
    lambda lt: st.lists(st.integers(0, 1023), min_size=lt[0] * lt[1], max_size=lt[0] * lt[1])
    .map(lambda c: Speech(np.array(c).reshape(lt))))
segment_lists = st.lists(st.one_of(texts.map(Text), images, videos, speeches), max_size=8)


@pytest.fixture(scope="module")
def table(text_tokenizer):
    return VocabTable.mio_default(len(text_tokenizer))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(segs=segment_lists)
def test_parse_inverts_render(segs, table, text_tokenizer):
    r = render(segs, table, TextEncoder(text_tokenizer))
    assert r.input_ids.shape == r.loss_mask.shape
    assert parse(r.input_ids, table, text_tokenizer) == canonical(segs)


def test_loss_mask_follows_segments(table, text_tokenizer):
    enc = TextEncoder(text_tokenizer)
    img = Image(np.arange(32))
    r = render([Text("hello", loss=False), img, Text(" world")], table, enc, bos_id=1, eos_id=2)
    n_hello = len(enc("hello"))
    assert r.input_ids[0] == 1 and not r.loss_mask[0]
    assert not r.loss_mask[1:1 + n_hello].any()
    block = r.input_ids[1 + n_hello:1 + n_hello + 34]
    assert block[0] == table.image_begin and block[-1] == table.image_end
    assert np.array_equal(block[1:-1] - table.image_start, np.arange(32))
    assert r.loss_mask[1 + n_hello:].all()
    assert np.array_equal(r.labels, np.where(r.loss_mask, r.input_ids, -100))


def test_speech_output_is_layer_major(table, text_tokenizer):
    codes = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    ids = render([Speech(codes)], table, TextEncoder(text_tokenizer)).input_ids
    assert ids[0] == table.speech_begin and ids[-1] == table.speech_end
    expected = [table.speech_start + k * 1024 + c for k in range(4) for c in codes[k]]
    assert ids[1:-1].tolist() == expected


@pytest.mark.parametrize("bad, message", [
    (lambda t: [t.image_begin] + [t.image_start] * 31 + [t.image_end], "32 image codes"),
    (lambda t: [t.speech_begin, t.speech_start + 1024, t.speech_start, t.speech_end], "layers come as"),
    (lambda t: [t.speech_begin, t.speech_start, t.speech_start + 1, t.speech_start + 1024, t.speech_end], "differ in length"),
    (lambda t: [5, t.image_start, 6], "outside a media block"),
    (lambda t: [t.speech_begin, t.speech_start], "</spch>"),
])
def test_parse_errors_name_position(bad, message, table, text_tokenizer):
    with pytest.raises(ParseError, match=message):
        parse(bad(table), table, text_tokenizer)


def test_bad_segments_are_named(table, text_tokenizer):
    with pytest.raises(VocabError, match="clip7: image code 9000"):
        render([Image(np.full(32, 9000))], table, TextEncoder(text_tokenizer), where="clip7")
    with pytest.raises(VocabError, match="unknown segment type"):
        render(["not a segment"], table, TextEncoder(text_tokenizer))  # type: ignore[list-item]


def test_pretrain_templates_cover_the_paper():
    assert set(PRETRAIN_TEMPLATES) == {"image_caption", "image_generation", "video_caption", "video_generation",
                                       "asr", "asr_stage3", "tts"}
    img = Image(np.zeros(32, dtype=np.int64))
    segs = fill_template(PRETRAIN_TEMPLATES["image_generation"], "a cat", img)
    assert segs == [Text('Please generate an image of "'), Text("a cat"), Text('": '), img]


def test_directions_are_drawn_with_the_papers_odds():
    rng = random.Random(0)
    video = Video(np.zeros((4, 32), dtype=np.int64))
    n = 4000
    t2v = sum(isinstance(pretrain_segments("video_text", [video, Text("x")], rng)[-1], Video) for _ in range(n))
    assert abs(t2v / n - 0.6) < 0.03
    speech = Speech(np.zeros((4, 5), dtype=np.int64))
    for _ in range(50):
        segs = pretrain_segments("speech_text", [speech, Text("x")], rng)
        sp = next(s for s in segs if isinstance(s, Speech))
        assert sp.codes.shape[0] == (4 if isinstance(segs[-1], Speech) else 1)  # ASR input: content only


def test_chatml_supervises_assistant_only(table, text_tokenizer):
    speech = Speech(np.arange(8).reshape(4, 2))
    turns = [Turn("user", [Text("say it"), speech]), Turn("assistant", [Text("ok "), speech])]
    segs = render_chat(turns, task="tts")
    assert segs[1].text == SYSTEM_SPEECH
    r = render(segs, table, TextEncoder(text_tokenizer))
    spans = [(s, len(render([s], table, TextEncoder(text_tokenizer)).input_ids)) for s in segs]
    pos = 0
    for seg, n in spans:
        assert r.loss_mask[pos:pos + n].all() == seg.loss and r.loss_mask[pos:pos + n].any() == seg.loss
        pos += n
    supervised = [s for s in segs if s.loss]
    assert supervised[-1] == Text("<|im_end|>")
    user_speech = [s for s in segs if isinstance(s, Speech)][0]
    assert user_speech.codes.shape == (1, 2) and not user_speech.loss  # input speech: content only
    assert render_chat(turns)[1].text == SYSTEM_STANDARD


@pytest.mark.parametrize("turns, message", [
    ([Turn("user", [Text("hi")])], "no assistant"),
    ([Turn("assistant", [Text("hi")])], "expected 'user'"),
    ([Turn("user", [Text("hi")]), Turn("assistant", [Text("  ")])], "empty content"),
    ([Turn("robot", [Text("hi")])], "unknown role"),
])
def test_bad_conversations(turns, message):
    with pytest.raises(ConversationError, match=message):
        render_chat(turns)


def test_pair_conversation_directions():
    img = Image(np.zeros(32, dtype=np.int64))
    cap = pair_conversation("image_captioning", img, "a cat")
    gen = pair_conversation("descriptive_image_generation", img, "a cat")
    assert cap[0].content[-1] == img and cap[1].content == [Text("a cat")]
    assert gen[1].content == [img] and gen[0].content[0].text.endswith("a cat")
