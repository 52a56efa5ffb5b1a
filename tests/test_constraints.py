"""ModalityConstraint: the allowed set after any prefix equals an independent, incremental
reference of the block grammar; it works inside transformers' generate with beam search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generate_support import media_model, one_thread  # noqa: F401 (autouse fixture)
from transformers import PreTrainedTokenizerFast

from mio.generate.constraints import ModalityConstraint
from mio.segments import Image, ParseError, Speech, Video, parse
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO, VocabTable, extend_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

# A small table (MIO's order: specials, then image codes, then speech codes) keeps sets readable.
SMALL = VocabTable.mio_default(20, image_codebook_size=8, speech_codebook_size=4, speech_layers=4)
PER_IMAGE, MAX_FRAMES = 3, 5
PADDED_VOCAB = SMALL.total_size + 3  # models often pad their output layer


def reference_allowed(seq: list[int], t: VocabTable, allow_image: bool = True, allow_speech: bool = True,
                      stops: list[int] | None = None) -> set[int]:
    """The grammar walked token by token from the start (no shortcuts shared with the code).
    ``stops``: an answer of media only, ending at one of these after a block."""
    mode, n, lens, closed = TEXT, 0, [], False
    for tok in seq:
        closed = mode != TEXT and tok in (t.image_end, t.speech_end)
        if mode == TEXT:
            if tok == t.image_begin:
                mode, n = IMAGE, 0
            elif tok == t.speech_begin:
                mode, lens = SPEECH, []
        elif mode == IMAGE:
            mode, n = (TEXT, n) if tok == t.image_end else (IMAGE, n + 1)
        elif tok == t.speech_end:
            mode = TEXT
        else:
            layer = (tok - t.speech_start) // t.speech_codebook_size
            if layer == len(lens):
                lens.append(1)
            else:
                lens[-1] += 1

    def layer(k: int) -> set[int]:
        start = t.speech_start + k * t.speech_codebook_size
        return set(range(start, start + t.speech_codebook_size))

    if mode == TEXT:
        begins = ({t.image_begin} if allow_image else set()) | ({t.speech_begin} if allow_speech else set())
        if stops is None:
            return set(range(t.text_size)) | begins
        return begins | (set(stops) if closed else set())
    if mode == IMAGE:
        return set(range(t.image_start, t.image_end_id)) if n < PER_IMAGE else {t.image_end}
    last = t.speech_layers - 1
    if not lens:
        return layer(0)
    if len(lens) == 1:
        nxt = layer(1) if last >= 1 else {t.speech_end}
        return nxt if lens[0] >= MAX_FRAMES else layer(0) | nxt
    k = len(lens) - 1
    if lens[k] < lens[0]:
        return layer(k)
    return {t.speech_end} if k == last else layer(k + 1)


def allowed_set(c: ModalityConstraint, seq: list[int]) -> set[int]:
    mask = c.allowed(torch.tensor([seq]), PADDED_VOCAB)[0]
    return set(torch.nonzero(mask).flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), allow_image=st.booleans(), allow_speech=st.booleans(), length=st.integers(1, 70),
       media_only=st.booleans())
def test_allowed_sets_match_the_reference_grammar(data, allow_image, allow_speech, length, media_only):
    media_only = media_only and (allow_image or allow_speech)
    stops = [0, 2] if media_only else None
    c = ModalityConstraint(SMALL, tokens_per_image=PER_IMAGE, max_speech_frames=MAX_FRAMES,
                           allow_image=allow_image, allow_speech=allow_speech, text_only_stops=stops)
    seq = [data.draw(st.integers(0, SMALL.text_size - 1))]  # a text token to start from
    for _ in range(length):
        want = reference_allowed(seq, SMALL, allow_image, allow_speech, stops)
        if seq[-1] in (stops or []):
            break  # the answer ended
        assert allowed_set(c, seq) == want, seq
        seq.append(data.draw(st.sampled_from(sorted(want))))
    # Whatever the walk produced, its closed blocks parse; an open block can only be the last one.
    state = c.state(np.asarray(seq))
    complete = seq if state.kind == TEXT else seq[:state.start]
    parse(complete, SMALL, SMALL_TOKENIZER, tokens_per_image=PER_IMAGE)


def _small_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of SMALL's 20 text tokens ("t0".."t17" and ChatML's two markers), extended
    with SMALL's tokens."""
    words = [f"t{i}" for i in range(SMALL.text_size - 2)] + ["<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")
    extend_tokenizer(tok, SMALL)
    return tok


SMALL_TOKENIZER = _small_tokenizer()


def test_batch_rows_get_their_own_sets():
    c = ModalityConstraint(SMALL, tokens_per_image=PER_IMAGE, max_speech_frames=MAX_FRAMES)
    t = SMALL
    rows = [[1, 1, t.image_begin, t.image_start], [1, t.speech_begin, t.speech_start, t.speech_start + 4], [1, 2, 3, 4]]
    mask = c.allowed(torch.tensor(rows), PADDED_VOCAB)
    for row, m in zip(rows, mask):
        assert set(torch.nonzero(m).flatten().tolist()) == reference_allowed(row, t)
    scores = c(torch.tensor(rows), torch.zeros(3, PADDED_VOCAB))
    assert torch.equal(torch.isfinite(scores), mask)
    assert not mask[:, SMALL.total_size:].any()  # padding rows of an output layer are never allowed


def test_video_frames_and_literal_mentions():
    t = SMALL
    c = ModalityConstraint(t, tokens_per_image=PER_IMAGE)
    frame = [t.image_begin, *range(t.image_start, t.image_start + PER_IMAGE), t.image_end]
    assert c.state(np.array([1, *frame, t.image_begin])).mode == VIDEO  # a second frame right after the first
    assert c.state(np.array([1, *frame, 5, t.image_begin])).mode == IMAGE
    assert c.state(np.array([1, *frame, 5])).mode == TEXT
    # "Start with <spch>." in a prompt: the begin token followed by text is no open block.
    assert c.state(np.array([1, t.speech_begin, 7, 8])).kind == TEXT
    assert c.state(np.array([1, t.image_begin, 7])).kind == TEXT
    assert c.state(np.array([1, t.speech_begin])).kind == SPEECH


def test_speech_with_one_layer_closes_after_it():
    t = VocabTable.mio_default(20, image_codebook_size=8, speech_codebook_size=4, speech_layers=1)
    c = ModalityConstraint(t, max_speech_frames=2)
    first = allowed_set_for(c, t, [1, t.speech_begin, t.speech_start])
    assert first == set(range(t.speech_start, t.speech_end_id)) | {t.speech_end}
    assert allowed_set_for(c, t, [1, t.speech_begin, t.speech_start, t.speech_start]) == {t.speech_end}


def allowed_set_for(c: ModalityConstraint, t: VocabTable, seq: list[int]) -> set[int]:
    return set(torch.nonzero(c.allowed(torch.tensor([seq]), t.total_size)[0]).flatten().tolist())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_inside_transformers_generate_with_cache_and_beams(num_beams):
    """transformers' own loop, KV cache on, beams reordered between steps: outputs still parse."""
    model, tok, table = media_model(seed=3, image_bias=3.0, speech_bias=3.0)
    c = ModalityConstraint(table, max_speech_frames=4)
    prompt = torch.tensor([[tok.bos_token_id, *tok("a cat")["input_ids"]]])
    for first in ([], [table.image_begin], [table.speech_begin]):
        ids = torch.cat([prompt, torch.tensor([first], dtype=torch.long).reshape(1, -1)], 1)
        out = model.generate(ids, max_new_tokens=70, num_beams=num_beams, do_sample=False, logits_processor=[c],
                             num_return_sequences=num_beams, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in out:
            seq = row.tolist()
            while seq and seq[-1] == tok.eos_token_id:
                seq.pop()
            state = c.state(np.asarray(seq))
            complete = seq if state.kind == TEXT else seq[:state.start]
            segments = parse(complete[1:], table, tok)
            if first == [table.image_begin]:  # 70 new tokens are enough to close the block
                assert isinstance(segments[1], (Image, Video)) and segments[1] is not None
            if first == [table.speech_begin]:
                assert isinstance(segments[1], Speech) and segments[1].codes.shape[0] == table.speech_layers


def test_parse_rejects_what_the_constraint_forbids():
    """The constraint's guarantee is what parse needs: a wrong speech order does not parse."""
    t = SMALL
    bad = [t.speech_begin, t.speech_start + t.speech_codebook_size, t.speech_end]  # layer 1 before layer 0
    with pytest.raises(ParseError):
        parse(bad, t, SMALL_TOKENIZER)
    c = ModalityConstraint(t)
    assert t.speech_start + t.speech_codebook_size not in allowed_set_for(c, t, [1, t.speech_begin])
