"""Segments <-> token ids: loss masks, parse errors, templates, ChatML (render/parse parity on every
tokenizer kind: test_tokenizer_parity.py)."""

import copy
import random

import numpy as np
import pytest

from mio.segments import Image, ParseError, SegmentRenderer, Speech, Text, Video, parse, text_form
from mio.templates import (
    PRETRAIN_TEMPLATES,
    SYSTEM_SPEECH,
    SYSTEM_STANDARD,
    ConversationError,
    Turn,
    fill_template,
    pair_conversation,
    pretrain_segments,
    render_chat,
)
from mio.vocab import VocabError, VocabTable, extend_tokenizer


@pytest.fixture(scope="module")
def table(text_tokenizer):
    return VocabTable.mio_default(len(text_tokenizer))


@pytest.fixture(scope="module")
def renderer(text_tokenizer, table):
    tok = copy.deepcopy(text_tokenizer)
    extend_tokenizer(tok, table)
    return SegmentRenderer(tok, table)


def test_loss_mask_follows_segments(renderer, table):
    tok = renderer.tokenizer
    img = Image(np.arange(32))
    r = renderer([Text("hello", loss=False), img, Text(" world")])
    n_hello = len(tok("hello", add_special_tokens=False)["input_ids"])
    assert r.input_ids[0] == tok.bos_token_id and not r.loss_mask[0]  # the tokenizer's BOS, never supervised
    assert not r.loss_mask[1:1 + n_hello].any()
    block = r.input_ids[1 + n_hello:1 + n_hello + 34]
    assert block[0] == table.image_begin and block[-1] == table.image_end
    assert np.array_equal(block[1:-1] - table.image_start, np.arange(32))
    assert r.loss_mask[1 + n_hello:].all()
    assert np.array_equal(r.labels, np.where(r.loss_mask, r.input_ids, -100))


def test_speech_output_is_layer_major(renderer, table):
    codes = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    ids = renderer([Speech(codes)]).input_ids[1:]  # after BOS
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
def test_parse_errors_name_position(bad, message, table, renderer):
    with pytest.raises(ParseError, match=message):
        parse(bad(table), table, renderer.tokenizer)


def test_bad_segments_are_named(renderer):
    with pytest.raises(VocabError, match="clip7: image code 9000"):
        renderer([Image(np.full(32, 9000))], where="clip7")
    with pytest.raises(VocabError, match="unknown segment type"):
        renderer([Text("a"), "not a segment"])  # type: ignore[list-item]


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


def test_chatml_supervises_assistant_only(renderer, table):
    speech = Speech(np.arange(8).reshape(4, 2))
    turns = [Turn("user", [Text("say it"), speech]), Turn("assistant", [Text("ok "), speech])]
    segs = render_chat(turns, task="tts")
    assert segs[1].text == SYSTEM_SPEECH
    r = renderer(segs)
    runs = np.split(np.arange(len(r.input_ids)), np.flatnonzero(np.diff(r.loss_mask.astype(int))) + 1)
    supervised = [run for run in runs if r.loss_mask[run[0]]]
    assert len(supervised) == 1  # one assistant turn: its content and its <|im_end|>, nothing else
    assistant = [s for s in segs if s.loss]
    assert assistant[-1] == Text("<|im_end|>")
    assert renderer.tokenizer.decode(r.input_ids[supervised[0]]) == text_form(assistant, table)
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
