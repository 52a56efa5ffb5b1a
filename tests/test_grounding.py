"""Grounding: location tokens in the layout table, the Box segment's round trip through tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mio.segments import Box, BoxError, Image, ParseError, SegmentRenderer, Text, parse, text_form
from mio.vocab import BOX_MARKERS, LocationTokens, VocabError, VocabTable, extend_tokenizer, extension_table

SCHEMES = [LocationTokens("bins", 16), LocationTokens("grid", 8)]


@pytest.fixture(scope="module", params=SCHEMES, ids=lambda loc: loc.scheme)
def grounded(request, text_tokenizer):
    """(tokenizer, table) of the tiny text tokenizer extended with location tokens."""
    tok = copy.deepcopy(text_tokenizer)
    table = extension_table(tok, request.param)
    extend_tokenizer(tok, table)
    return tok, table


def test_location_tokens_come_after_mios_layout():
    plain = VocabTable.mio_default(64000)
    for loc in (LocationTokens("bins", 1000), LocationTokens("grid", 32)):
        t = VocabTable.mio_default(64000, locations=loc)
        # MIO's ids never move: every id of the plain table is the same, the new ones follow.
        assert {k: t.specials[k] for k in plain.specials} == plain.specials
        assert (t.image_start, t.speech_start) == (plain.image_start, plain.speech_start)
        assert t.added_tokens()[:plain.num_added] == plain.added_tokens()
        assert [t.specials[m] for m in BOX_MARKERS] == list(range(76294, 76298))
        assert t.location_start == 76298 and t.total_size == 76298 + loc.count
        assert t.added_tokens()[-1] == f"<loc{loc.count - 1}>"
        assert t.describe(t.location_start + 5) == ("location", 0, 5)
        assert VocabTable(**t.to_dict()) == t  # saved and loaded as data


def test_a_table_without_location_tokens_refuses_boxes():
    t = VocabTable.mio_default(500)
    with pytest.raises(VocabError, match="no location tokens.*model.location_tokens"):
        _ = t.locations
    from mio.segments import segment_ids
    with pytest.raises(VocabError, match="no location tokens"):
        segment_ids(Box((0.1, 0.1, 0.5, 0.5)), t)
    with pytest.raises(VocabError, match="scheme must be one of"):
        LocationTokens("polygon", 10)


_coord = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def boxes(draw):
    x = sorted([draw(_coord), draw(_coord)])
    y = sorted([draw(_coord), draw(_coord)])
    return (x[0], y[0], x[1], y[1])


@given(st.sampled_from(["bins", "grid"]), st.integers(2, 1000), boxes())
def test_encode_decode_within_half_a_bin(scheme, size, box):
    loc = LocationTokens(scheme, min(size, 64) if scheme == "grid" else size)
    codes = loc.encode(box)
    assert codes.shape == (loc.per_box,) and codes.min() >= 0 and codes.max() < loc.count
    back = loc.decode(codes)
    assert np.max(np.abs(np.subtract(back, box))) <= 0.5 / loc.size + 1e-12
    assert back[2] >= back[0] and back[3] >= back[1]


def test_bins_order_is_x1_y1_x2_y2_and_grid_cells_are_row_major():
    assert LocationTokens("bins", 10).encode((0.05, 0.25, 0.95, 1.0)).tolist() == [0, 2, 9, 9]
    # Kosmos-2: cell = row * P + column; top-left (x 0.3 -> col 1, y 0.6 -> row 2) of a 4x4 grid.
    assert LocationTokens("grid", 4).encode((0.3, 0.6, 0.99, 0.76)).tolist() == [2 * 4 + 1, 3 * 4 + 3]
    assert LocationTokens("grid", 4).decode([9, 15]) == (0.375, 0.625, 0.875, 0.875)


def test_box_checks_its_coordinates():
    with pytest.raises(BoxError):
        Box((0.5, 0.1, 0.4, 0.3))  # x2 < x1
    with pytest.raises(BoxError):
        Box((0.1, 0.1, 1.2, 0.3))


@settings(max_examples=40, deadline=None)
@given(boxes(), st.sampled_from([None, "the cat", "a red rocket"]), st.sampled_from(["", "where is it? ", "a "]))
def test_box_renders_as_the_tokenizer_encodes_and_parses_back(grounded, box, phrase, before):
    tok, table = grounded
    renderer = SegmentRenderer(tok, table)
    codes = np.arange(32) % 7
    segs = [Image(codes), Text(before), Box(box, phrase), Text(" on the mat")]
    r = renderer(segs)
    assert r.input_ids.tolist() == tok(text_form(segs, table))["input_ids"]
    back = parse(r.input_ids, table, tok)
    got = next(s for s in back if isinstance(s, Box))
    assert got.phrase == phrase
    assert np.max(np.abs(np.subtract(got.coords, box))) <= 0.5 / table.locations.size + 1e-12
    assert renderer(back).input_ids.tolist() == r.input_ids.tolist()  # the parsed box renders to the same ids


def test_supervision_covers_a_box_answer(grounded):
    """A box as the answer is supervised; as the question (input), it is not."""
    tok, table = grounded
    renderer = SegmentRenderer(tok, table)
    r = renderer([Text("where is the cat?", loss=False), Box((0.1, 0.2, 0.3, 0.4), loss=True)])
    loc = table.is_location(r.input_ids)
    assert loc.sum() == table.locations.per_box and r.loss_mask[loc].all()
    r = renderer([Text("what is in ", loss=False), Box((0.1, 0.2, 0.3, 0.4), loss=False), Text("? a cat", loss=True)])
    assert not r.loss_mask[table.is_location(r.input_ids)].any()


def test_malformed_boxes_do_not_parse(grounded):
    tok, table = grounded
    begin, end = table.specials["<box>"], table.specials["</box>"]
    per = table.locations.per_box
    loc = table.location_start
    with pytest.raises(ParseError, match="location tokens and </box>"):
        parse([begin, *([loc] * (per - 1)), end], table, tok)
    with pytest.raises(ParseError, match="outside a media block"):
        parse([loc], table, tok)
    if table.location_scheme == "bins":  # x2 < x1
        with pytest.raises(ParseError, match="x2 >= x1"):
            parse([begin, loc + 5, loc, loc + 1, loc + 3, end], table, tok)


def test_a_stage_extends_a_backbone_with_location_tokens(tiny_base, tmp_path):
    """model.location_tokens: the extended model, tokenizer and saved table agree; the settings
    arrive as the dataclass or as the mapping a config gives."""
    from mio.model.backbone import load_backbone, save_model_folder
    from mio.vocab import folder_table

    loc = LocationTokens.of({"scheme": "grid", "size": 4})
    model, tok, table = load_backbone(tiny_base, extend=True, locations=loc)
    assert table.locations == loc and len(tok) == table.total_size == model.get_input_embeddings().weight.shape[0]
    assert tok.convert_tokens_to_ids(["<box>", "<loc15>"]) == [table.specials["<box>"], table.location_start + 15]
    folder = save_model_folder(model, tok, table, tmp_path / "model")
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)
    assert VocabTable.load(folder) == table == folder_table(tiny_base, base_tok, extend=True, locations=loc)
    with pytest.raises(ValueError, match="extend_vocab"):
        load_backbone(folder, locations=loc)  # a fixed table gains no tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sentencepiece_legacy", "sentencepiece", "gpt2", "qwen2", "llama3"])
def test_boxes_render_as_every_tokenizer_kind_encodes(kind, tmp_path):
    """render == tokenizer(text_form) and render(parse(render)) == render with boxes and phrases, on
    SentencePiece (legacy and not), GPT-2, Qwen2 and Llama-3 style tokenizers."""
    import tokenizer_kinds

    tok = tokenizer_kinds.build(kind, tmp_path)
    table = extension_table(tok, LocationTokens("bins", 16))
    extend_tokenizer(tok, table)
    renderer = SegmentRenderer(tok, table)
    samples = [[Text("where is the cat?"), Box((0.1, 0.2, 0.3, 0.4))],
               [Image(np.arange(32)), Text(" a "), Box((0.5, 0.5, 0.9, 1.0), "red rocket"), Text(" on the pad")],
               [Box((0.0, 0.0, 1.0, 1.0), " the sky"), Box((0.2, 0.2, 0.4, 0.4)), Text("and a dog")]]
    for segs in samples:
        r = renderer(segs)
        assert r.input_ids.tolist() == tok(text_form(segs, table))["input_ids"]
        assert renderer(parse(r.input_ids, table, tok)).input_ids.tolist() == r.input_ids.tolist()
