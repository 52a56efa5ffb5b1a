"""The extended vocabulary: MIO's layout, ids <-> codes both ways, extension of a backbone."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mio.model.backbone import load_backbone
from mio.vocab import MIO_SPECIAL_ORDER, VocabError, VocabTable, extend_backbone, folder_table


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


def test_one_rule_chooses_a_folders_table(tiny_base, tmp_path):
    """folder_table: the table file; else an extended tokenizer (with MIO's config ids); else a
    text-only base, which only a stage that extends may use."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(tiny_base)
    assert folder_table(tiny_base, base_tok, extend=True) == VocabTable.mio_default(len(base_tok))
    with pytest.raises(VocabError, match="extend_vocab: true"):
        folder_table(tiny_base, base_tok)
    model, tok, table = load_backbone(tiny_base, extend=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert folder_table(tmp_path, tok) == table  # no table file: the tokenizer's added tokens
    other = VocabTable(**{**table.to_dict(), "speech_layers": 1, "speech_codebook_size": 4096})
    other.save(tmp_path)
    assert folder_table(tmp_path, tok) == other  # a table file wins


def test_mio_config_ids_not_token_names(tiny_base):
    """MIO's config.json states the specials' ids; the placeholders may have any name (the
    release never says theirs), and a block marker elsewhere than the config says is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    v = len(tok)
    tok.add_tokens(["<spch_pad>", "</spch>", "<img_pad>", "<spch>", "</image>", "<image>"]
                   + [f"<img{i}>" for i in range(8192)] + [f"<spch{i}>" for i in range(4096)])
    config = {"text_vocab_size": v, "num_new_special_tokens": 6, "speech_placeholder_id": v, "speech_eos_id": v + 1,
              "image_placeholder_id": v + 2, "speech_bos_id": v + 3, "image_eos_id": v + 4, "image_bos_id": v + 5,
              "vocab_size": v + 6 + 8192 + 4096}
    table = VocabTable.from_tokenizer(tok, config)
    default = VocabTable.mio_default(v)
    assert (table.text_size, table.image_begin, table.image_end, table.speech_begin, table.speech_end,
            table.image_start, table.speech_start, table.total_size) == \
        (default.text_size, default.image_begin, default.image_end, default.speech_begin, default.speech_end,
         default.image_start, default.speech_start, config["vocab_size"])
    assert table.specials["<spch_pad>"] == v and table.specials["<img_pad>"] == v + 2
    with pytest.raises(VocabError, match=f"says speech_eos_id {v + 5}, but the tokenizer has </spch> at id {v + 1}"):
        VocabTable.from_tokenizer(tok, {**config, "image_bos_id": v + 1, "speech_eos_id": v + 5})


def test_extend_refuses_mismatched_tokenizer(tiny_base):
    model, tok, _ = load_backbone(tiny_base, extend=True)
    from transformers import AutoTokenizer
    fresh = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(VocabError, match="embedding rows"):
        extend_backbone(model, fresh)
