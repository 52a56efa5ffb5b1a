"""Tokenizer parity: the ids a sample trains on (and a prompt generates from) are exactly what the
backbone's own tokenizer gives for the sample's text form, on the three kinds of tokenizer real
backbones bring (tests/tokenizer_kinds.py); loss masks follow character spans; parse inverts."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import tokenizer_kinds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from mio.data.reading import DatasetSpec, TrainingRenderer
from mio.data.shards import StoredSample
from mio.generate import Generator
from mio.model.backbone import save_model_folder
from mio.segments import Image, SegmentRenderer, Speech, Text, Video, canonical, parse, text_form
from mio.templates import Turn, render_chat
from mio.vocab import CHAT_MARKERS, VocabTable, extend_tokenizer, missing_chat_markers

IMAGE_CODES, SPEECH_CODES = 64, 16  # small codebooks: parity does not depend on their size
TEXT_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
MARKERS = [" ", "  ", "\n", " a", "the cat", ": ", "über", "東京", "<|im_start|>", "<|im_end|>", "!"]


def segment_lists(text_alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[list]:
    texts = st.lists(st.one_of(st.text(text_alphabet, max_size=10), st.sampled_from(MARKERS)),
                     min_size=1, max_size=4).map("".join)
    loss = st.booleans()
    images = st.tuples(st.lists(st.integers(0, IMAGE_CODES - 1), min_size=32, max_size=32), loss).map(
        lambda c: Image(np.array(c[0]), loss=c[1]))
    videos = st.tuples(st.integers(2, 3).flatmap(
        lambda f: st.lists(st.integers(0, IMAGE_CODES - 1), min_size=32 * f, max_size=32 * f)), loss).map(
        lambda c: Video(np.array(c[0]).reshape(-1, 32), loss=c[1]))
    speeches = st.tuples(st.sampled_from([1, 4]), st.integers(1, 6), loss).flatmap(
        lambda lt: st.lists(st.integers(0, SPEECH_CODES - 1), min_size=lt[0] * lt[1], max_size=lt[0] * lt[1])
        .map(lambda c: Speech(np.array(c).reshape(lt[0], lt[1]), loss=lt[2])))
    return st.lists(st.one_of(st.tuples(texts, loss).map(lambda t: Text(*t)), images, videos, speeches), max_size=7)


class Kind(tuple):
    """(name, tokenizer, table, renderer), shown by its name in failure reports."""

    def __repr__(self) -> str:
        return f"<{self[0]} tokenizer>"


@pytest.fixture(scope="module", params=tokenizer_kinds.KINDS)
def kind(request, tmp_path_factory):
    tok = tokenizer_kinds.build(request.param, tmp_path_factory.mktemp(request.param))
    text_size = len(tok) + len(missing_chat_markers(tok))  # ChatML's markers join the text vocabulary first
    table = extend_tokenizer(tok, VocabTable.mio_default(text_size, image_codebook_size=IMAGE_CODES,
                                                         speech_codebook_size=SPEECH_CODES))
    return Kind((request.param, tok, table, SegmentRenderer(tok, table)))


def expected_mask(segs, table, tok) -> np.ndarray:
    """The stated rule, computed from the whole text form's own offsets: a token is supervised when
    a character it covers (the one at its position, when it covers none) is in a supervised segment;
    tokens the tokenizer adds itself are not."""
    text = text_form(segs, table)
    flags = np.concatenate([np.full(len(text_form([s], table)), s.loss, dtype=bool) for s in segs] or [[]])
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for (start, end), added in zip(enc["offset_mapping"], enc["special_tokens_mask"]):
        start = min(start, len(text) - 1)
        out.append(not added and len(text) > 0 and bool(flags[start:max(end, start + 1)].any()))
    return np.array(out, dtype=bool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segs=segment_lists(TEXT_ALPHABET))
def test_render_equals_the_tokenizer_on_the_text_form(kind, segs):
    _, tok, table, renderer = kind
    rendered = renderer(segs)
    assert rendered.input_ids.tolist() == tok(text_form(segs, table))["input_ids"]
    assert rendered.loss_mask.tolist() == expected_mask(segs, table, tok).tolist()


# Texts without "<": a text holding a media token's string renders as that token (as the tokenizer
# does), so only texts without one can parse back to themselves.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segs=segment_lists(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="<")))
def test_parse_inverts_render(kind, segs):
    name, tok, table, renderer = kind
    ids = renderer(segs).input_ids
    parsed = parse(ids, table, tok)
    assert renderer(parsed).input_ids.tolist() == ids.tolist()  # always: parse picks a text that encodes back
    if name in ("gpt2", "llama3"):  # these tokenizers map distinct texts to distinct ids
        assert parsed == canonical(segs)


@pytest.mark.parametrize("kind", ["sentencepiece_legacy", "sentencepiece"], indirect=True)
def test_sentencepiece_whole_string_is_not_piece_by_piece(kind):
    """DESIGN.md's SentencePiece case: encoded one by one, each text gains a dummy prefix; the whole
    string does not."""
    _, tok, table, renderer = kind
    segs = [Image(np.arange(32)), Text(" The caption of this image is: "), Text("a red cat")]
    whole = renderer(segs).input_ids.tolist()
    by_piece = [tok.bos_token_id, *renderer([segs[0]]).input_ids[1:].tolist(),
                *[i for s in segs[1:] for i in tok(s.text, add_special_tokens=False)["input_ids"]]]
    assert whole == tok(text_form(segs, table))["input_ids"]
    assert len(by_piece) == len(whole) + 1  # exactly the extra "▁" of the separately encoded text


def test_a_token_straddling_the_supervised_boundary_is_supervised(kind):
    _, tok, table, renderer = kind
    # "hel" (prompt) + "lo world" (answer): the tokenizer merges across the boundary somewhere.
    segs = [Text("say: hel", loss=False), Text("lo world")]
    rendered = renderer(segs)
    enc = tok(text_form(segs, table), return_offsets_mapping=True)
    boundary = len("say: hel")
    assert any(start < boundary < end for start, end in enc["offset_mapping"])  # a token does straddle
    for (start, end), supervised in zip(enc["offset_mapping"], rendered.loss_mask):
        if end > start:
            assert supervised == (end > boundary), (start, end)


def test_pretraining_samples_end_with_eos_and_sft_with_im_end(kind):
    """The data path renders through the same renderer: a pretraining sample is the tokenizer's
    ids of its text form plus the EOS token; an SFT conversation ends at its last <|im_end|>."""
    _, tok, table, _ = kind
    renderer = TrainingRenderer(tok, table)
    image = Image(np.arange(32) % IMAGE_CODES)
    sample = StoredSample("s1", "image_text", [image, Text("a red rocket")])
    rendered = renderer(sample, DatasetSpec("d"), random.Random(0))
    segs, _ = renderer.segments(sample, DatasetSpec("d"), random.Random(0))
    assert rendered.input_ids.tolist() == tok(text_form(segs, table))["input_ids"]
    assert rendered.input_ids[-1] == tok.eos_token_id and rendered.labels[-1] == tok.eos_token_id
    turns = [Turn("user", [Text("what is it?"), image]), Turn("assistant", [Text("a rocket")])]
    chat = renderer(StoredSample("c1", "sft", turns=turns), DatasetSpec("d", format="sft"), random.Random(0))
    assert chat.input_ids.tolist() == tok(text_form(render_chat(turns), table))["input_ids"]


@pytest.mark.parametrize("kind", ["sentencepiece"], indirect=True)
def test_generation_prompts_with_the_ids_training_renders(kind, tmp_path):
    """`mio generate` turns prompt segments into ids through the same renderer: the tokenizer's
    ids of the prompt's text form (here a SentencePiece tokenizer, where piecewise encoding differs),
    from a model folder as a stage writes it."""
    _, tok, table, _ = kind
    config = LlamaConfig(vocab_size=table.total_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    gen = Generator(save_model_folder(LlamaForCausalLM(config), tok, table, tmp_path / "model"), device="cpu")
    turns = [Turn("user", [Text("describe this: "), Image(np.arange(32) % IMAGE_CODES), Text(" a red cat")])]
    g = gen.generate(turns, max_new_tokens=1, outputs=["text"])
    assert g.prompt_ids.tolist() == tok(text_form(gen.prompt_segments(turns), table))["input_ids"]


def test_chat_markers_are_one_token_each(kind, text_tokenizer):
    """A tokenizer without ChatML's markers gets them when extended, one id each right after its text
    vocabulary; an SFT conversation then renders each marker as that one token."""
    _, tok, table, renderer = kind
    start, end = tok.convert_tokens_to_ids(list(CHAT_MARKERS))
    assert {start, end} == {table.text_size - 2, table.text_size - 1}
    turns = [Turn("user", [Text("hi")]), Turn("assistant", [Text("hello")])]
    ids = renderer(render_chat(turns)).input_ids.tolist()
    assert ids.count(start) == 3 and ids.count(end) == 3 and ids[-1] == end  # system, user, assistant
    pieces = tok.convert_ids_to_tokens(ids)
    assert not any("im_start" in p or "im_end" in p for p in pieces if p not in CHAT_MARKERS)
    kept = copy.deepcopy(text_tokenizer)  # mio's tiny tokenizer has them: they keep their ids
    before = kept.convert_tokens_to_ids(list(CHAT_MARKERS))
    extend_tokenizer(kept)
    assert kept.convert_tokens_to_ids(list(CHAT_MARKERS)) == before


def test_padding_and_truncation_left_on_the_tokenizer_change_no_sample(kind):
    """A padded, truncated call of the tokenizer (or a tokenizer.json that ships such settings) leaves
    them on its backend; samples still render whole and unpadded, the tokenizer keeps its settings."""
    _, tok, table, _ = kind
    tok = copy.deepcopy(tok)  # the module's tokenizer stays as it is
    tok.pad_token = tok.eos_token
    tok(["a", "hello world the cat"], padding=True, truncation=True, max_length=3)  # before the renderer exists
    renderer = SegmentRenderer(tok, table)
    tok(["a", "hello world the cat"], padding=True, truncation=True, max_length=3)  # and after
    samples = [[Text("hello world the cat sat on the mat")], [Text("a")],
               [Text("look: "), Image(np.arange(32) % IMAGE_CODES), Text(" a red cat")]]
    rendered = renderer.finish([renderer.draft(s) for s in samples])
    assert [r.input_ids.tolist() for r in rendered] == [tok(text_form(s, table))["input_ids"] for s in samples]
    assert len(rendered[0].input_ids) > 3
