"""The extended vocabulary: MIO's layout, ids <-> codes both ways, extension of a backbone."""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mio.model.backbone import load_backbone
from mio.vocab import MIO_SPECIAL_ORDER, VocabError, VocabTable, extend_backbone


def test_mio_released_layout():
    t = VocabTable.mio_default(64000)
    assert t.total_size == 76294  # MIO-7B's released vocab_size
    assert t.num_added == 6 + 8192 + 4096
    assert [t.specials[s] for s in MIO_SPECIAL_ORDER] == list(range(64000, 64006))
    assert t.specials["<spch>"] == 64003 and t.specials["</image>"] == 64004 and t.specials["<image>"] == 64005
    toks = t.added_tokens()
    assert toks[6] == "<img0>" and toks[6 + 8191] == "<img8191>" and toks[-1] == "<spch4095>"


@given(st.integers(0, 3), st.lists(st.integers(0, 1023), min_size=1, max_size=50),
       st.lists(st.integers(0, 8191), min_size=1, max_size=40))
def test_ids_codes_round_trip(layer, speech, image):
    t = VocabTable.mio_default(500)
    codes = np.array([speech] * (layer + 1))
    ids = t.speech_ids(codes)
    layers, back = t.speech_codes(ids.reshape(-1))
    assert np.array_equal(back.reshape(codes.shape), codes)
    assert np.array_equal(layers.reshape(codes.shape), np.repeat(np.arange(layer + 1)[:, None], len(speech), 1))
    assert np.array_equal(t.image_codes(t.image_ids(np.array(image))), image)
    for i in ids.reshape(-1)[:3]:
        mod, lay, code = t.describe(int(i))
        assert mod == "speech" and code == t.speech_codes(np.array([i]))[1][0] and lay == t.speech_codes(np.array([i]))[0][0]


def test_codes_out_of_range_are_named():
    t = VocabTable.mio_default(500)
    with pytest.raises(VocabError, match="image code 8192"):
        t.image_ids(np.array([1, 8192]), where="img.jpg")
    with pytest.raises(VocabError, match="speech code -1"):
        t.speech_ids(np.array([[0, -1]]))
    with pytest.raises(VocabError, match="outside the vocabulary"):
        t.describe(10**6)


def test_overlapping_layout_is_refused():
    t = VocabTable.mio_default(500)
    with pytest.raises(VocabError, match="overlap"):
        VocabTable(**{**t.to_dict(), "speech_start": t.image_start + 10})


def test_extend_save_load_and_derive(tiny_base, tmp_path):
    model, tok, table = load_backbone(tiny_base, extend=True)
    assert len(tok) == table.total_size == model.get_input_embeddings().weight.shape[0]
    emb = model.get_input_embeddings().weight.detach()
    mean = emb[: table.text_size].mean(0)
    # New rows start at the mean of the old ones (transformers' mean_resizing adds tiny noise).
    assert torch.allclose(emb[table.text_size:], mean.expand_as(emb[table.text_size:]), atol=1e-3)
    assert tok.convert_tokens_to_ids("<img7>") == table.image_start + 7
    assert tok.convert_tokens_to_ids("<spch1025>") == table.speech_start + 1025
    table.save(tmp_path)
    assert VocabTable.load(tmp_path) == table
    assert VocabTable.from_tokenizer(tok) == table
    with pytest.raises(VocabError, match="extended before"):
        extend_backbone(model, tok)


def test_extend_refuses_mismatched_tokenizer(tiny_base):
    model, tok, _ = load_backbone(tiny_base, extend=True)
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(VocabError, match="embedding rows"):
        extend_backbone(model, fresh)
