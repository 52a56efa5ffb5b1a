"""The box constraint: after <box> exactly the scheme's location tokens, bounded so that x2 >= x1
and y2 >= y1, then </box>; 1,000 boxes sampled from a random tiny model all parse valid."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import Decoder
from mio.generate.settings import DecodeSettings
from mio.segments import Box, parse
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO, LocationTokens, VocabTable, extend_tokenizer, missing_chat_markers

SCHEMES = [LocationTokens("bins", 6), LocationTokens("grid", 4)]


def small_table(loc: LocationTokens, text_size: int = 20) -> VocabTable:
    return VocabTable.mio_default(text_size, image_codebook_size=8, speech_codebook_size=4, speech_layers=4,
                                  locations=loc)


def reference_locations(loc: LocationTokens, prefix: list[int]) -> set[int]:
    """Brute force, apart from the code's bounds: the codes c for which some completion of
    ``prefix + [c]`` decodes to a box with x2 >= x1 and y2 >= y1."""
    ok = set()
    rest = loc.per_box - len(prefix) - 1
    for c in range(loc.count):
        for tail in itertools.product(range(loc.count), repeat=rest):
            x1, y1, x2, y2 = loc.decode([*prefix, c, *tail])
            if x2 >= x1 and y2 >= y1:
                ok.add(c)
                break
    return ok


@pytest.mark.parametrize("loc", SCHEMES, ids=lambda loc: loc.scheme)
def test_allowed_sets_inside_a_box_equal_the_brute_force(loc):
    t = small_table(loc)
    c = ModalityConstraint(t)
    begin, end = t.specials["<box>"], t.specials["</box>"]
    rng = np.random.default_rng(0)
    for _ in range(30):
        row = [3, 4, begin]
        codes: list[int] = []
        for _ in range(loc.per_box):
            allowed = c.allowed(torch.tensor([row]), t.total_size)[0]
            want = {t.location_start + x for x in reference_locations(loc, codes)}
            assert set(np.flatnonzero(allowed.numpy()).tolist()) == want
            codes.append(int(rng.choice(sorted(want))) - t.location_start)
            row.append(t.location_start + codes[-1])
        assert np.flatnonzero(c.allowed(torch.tensor([row]), t.total_size)[0].numpy()).tolist() == [end]
        row.append(end)
        outside = set(np.flatnonzero(c.allowed(torch.tensor([row]), t.total_size)[0].numpy()).tolist())
        assert outside == set(range(t.text_size)) | {t.image_begin, t.speech_begin, begin, t.specials["<phrase>"]}


def test_phrases_hold_text_and_lead_to_a_box():
    t = small_table(SCHEMES[0])
    c = ModalityConstraint(t)
    p0, p1, b0 = t.specials["<phrase>"], t.specials["</phrase>"], t.specials["<box>"]
    inside = set(np.flatnonzero(c.allowed(torch.tensor([[3, p0, 5]]), t.total_size)[0].numpy()).tolist())
    assert inside == set(range(t.text_size)) | {p1}
    assert np.flatnonzero(c.allowed(torch.tensor([[3, p0, 5, p1]]), t.total_size)[0].numpy()).tolist() == [b0]
    # Several rows at once (the batched path) agree with one at a time.
    rows = torch.tensor([[3, p0, 5, p1], [3, 3, 3, 3], [p0, 5, p1, b0]])
    assert torch.equal(c.allowed(rows, t.total_size),
                       torch.cat([c.allowed(r[None], t.total_size) for r in rows]))
    # No location tokens, no boxes: the plain table's outside set has no box markers.
    plain = ModalityConstraint(VocabTable.mio_default(20, 8, 4, 4))
    assert not plain.allowed(torch.tensor([[3]]), t.total_size)[0, t.text_size + 30:].any()


@pytest.mark.parametrize("loc", SCHEMES, ids=lambda loc: loc.scheme)
def test_a_thousand_sampled_boxes_all_parse_valid(loc, text_tokenizer):
    tok = copy.deepcopy(text_tokenizer)
    t = small_table(loc, text_size=len(tok) + len(missing_chat_markers(tok)))
    extend_tokenizer(tok, t)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=t.total_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64)).eval()
        with torch.no_grad():  # sharp, random preferences among location tokens: unconstrained, many x2 < x1
            model.lm_head.weight.mul_(50.0)
    sample = DecodeSettings(do_sample=True, top_p=1.0)
    settings = {m: sample for m in (TEXT, IMAGE, VIDEO, SPEECH)}
    decoder = Decoder(model, ModalityConstraint(t), settings, stop_ids=[tok.eos_token_id])
    begin = t.specials["<box>"]
    prompts = [[int(tok.bos_token_id or 1), 5 + (i % 7), begin] for i in range(1000)]
    results = decoder.run_batch(prompts, loc.per_box + 1, seeds=list(range(1000)))
    boxes = [parse([begin, *r.ids], t, tok) for r in results]
    assert all(len(b) == 1 and isinstance(b[0], Box) for b in boxes)
    codes = {tuple(np.subtract(r.ids[:loc.per_box], t.location_start).tolist()) for r in results}
    # The samples differ and the bound was exercised: many boxes start past the first bin or cell,
    # where an unbounded draw of their second corner could fall before it.
    assert len(codes) >= 10 and sum(loc.bound(c[:loc.per_box - 1]) > 0 for c in codes) >= 5


def test_generate_reads_and_writes_boxes_and_draws_them(tmp_path):
    """A box in the prompt ({box:...}) and boxes in the answer are drawn on the prompt's image in
    transcript.html; a model without location tokens refuses a box prompt, saying why."""
    from test_generate_support import SAMPLES, text_tokenizer, tiny_media
    from transformers import PhiConfig, PhiForCausalLM

    from mio.generate.generator import Generator
    from mio.generate.media import MediaFile
    from mio.generate.prompt import prompt_items
    from mio.vocab import extend_backbone

    tok = copy.deepcopy(text_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=512))
        table = extend_backbone(model, tok, locations=LocationTokens("bins", 16))
        with torch.no_grad():
            model.lm_head.bias[table.specials["<box>"]] += 12.0  # boxes in every answer
    gen = Generator.from_loaded(model.eval(), tok, table, tiny_media())
    items = prompt_items("What is in {box:0.25,0.25,0.75,0.5} of {image}?", [MediaFile.guess(SAMPLES / "images" / "cat.jpg")])
    assert items[1] == Box((0.25, 0.25, 0.75, 0.5))
    g = gen.generate([*items], chat=False, max_new_tokens=12, settings={TEXT: {"num_beams": 1}})
    answer_boxes = [s for s in g.segments if isinstance(s, Box)]
    assert answer_boxes and all(b.coords[2] >= b.coords[0] and b.coords[3] >= b.coords[1] for b in answer_boxes)
    gen.write(g, tmp_path)
    html = (tmp_path / "transcript.html").read_text()
    assert html.count('<div class="box"') == 1 + len(answer_boxes)
    assert "left:25.00%;top:25.00%;width:50.00%;height:25.00%" in html  # the prompt's box, on the cat
    with pytest.raises(ValueError, match=r"\{box:x1,y1,x2,y2\}"):
        prompt_items("{box:0.5,0.1}", [])
    plain = VocabTable.mio_default(len(text_tokenizer()) + 2)
    from mio.segments import segment_ids
    with pytest.raises(Exception, match="no location tokens"):
        segment_ids(Box((0.1, 0.1, 0.2, 0.2)), plain)
