"""Classifier-free guidance in the decoding loop, against references computed apart.

- guidance 1.0 is unguided decoding: logits within 1e-6, the same tokens (also for a sequence
  whose other, guided modality never opens a block: it never runs an unconditional row);
- with guidance above 1, the logits every media token was chosen from equal
  ``uncond + s * (cond - uncond)`` of two plain full-sequence forwards of the model (no KV cache,
  no mio decoding code) over the conditional and the unconditional sequence (the loop with and
  without its KV cache); text tokens' logits are the conditional forward's -- with text decoded
  greedily and by beam search; the unconditional row is in the batch inside guided blocks only,
  joining each one with the unconditional prompt and every token made so far;
- a guided greedy answer's text equals the unguided one's up to its first media block;
- a batch of guided prompts equals the prompts run one at a time (greedy, seeded sampling);
- the settings: guidance per media modality, beam search with guidance refused, presets.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from eval_support import tiny_clip_folder
from test_eval import evalset  # noqa: F401 (fixture)
from test_generate_support import media_model, one_thread, save_media_model  # noqa: F401 (autouse fixture)

from mio.data.reading import DatasetSpec, TrainingRenderer
from mio.data.shards import StoredSample
from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import Decoder
from mio.generate.generator import Generator
from mio.generate.settings import MODES, PRESETS, DecodeSettings, get_preset, overrides_from_strings, resolve_settings
from mio.segments import Image, Text
from mio.templates import MIO_RELEASE, PAPER
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO

PROMPTS = ["a cat", "hello world, please generate an image of a cat sitting on a mat", "transcribe this speech",
           "hi", "You are MIO, an AI assistant"]


def settings_of(text_beams: int = 1, sample: bool = False, **guidance: float) -> dict[str, DecodeSettings]:
    """Greedy (or sampled, top-p 0.9) media, text by greedy or beam search; ``guidance`` per mode."""
    media = DecodeSettings(do_sample=sample, top_p=0.9 if sample else 1.0)
    out = {m: DecodeSettings(**{**media.__dict__, "guidance": guidance.get(m, 1.0)}) for m in MODES}
    out[TEXT] = DecodeSettings(num_beams=text_beams, do_sample=False, top_p=1.0) if text_beams > 1 or not sample \
        else media
    return out


def prompt_ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id, *tok(text)["input_ids"]]


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    """(L, V) logits of one plain forward over the whole sequence: no cache, no padding."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def test_guidance_one_is_unguided_decoding():
    model, tok, table = media_model(seed=3, image_bias=3.0, speech_bias=3.0, stop_bias=1.0, scale=2.0)
    c = ModalityConstraint(table, allow_speech=False)  # speech never opens: its guidance never applies
    prompt, uncond = prompt_ids(tok, PROMPTS[1]), prompt_ids(tok, "hi")
    stop = model.generation_config.eos_token_id
    plain = Decoder(model, c, settings_of(), stop, keep_logits=True).run(prompt, 80)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:  # image and video at 1.0; speech guided, but no speech block opens
        one = Decoder(model, c, settings_of(image=1.0, video=1.0, speech=3.0), stop, keep_logits=True).run(
            prompt, 80, uncond_ids=uncond)
    finally:
        hook.remove()
    assert set(rows) == {1}  # the unconditional row joins a guided block only: it never ran
    assert one.ids == plain.ids and one.modes == plain.modes
    assert {IMAGE, TEXT} <= set(one.modes)
    diff = max(float((a - b).abs().max()) for a, b in zip(one.logits, plain.logits))
    assert diff <= 1e-6
    # Every mode at 1.0: no unconditional row at all, the same result.
    off = Decoder(model, c, settings_of(image=1.0), stop, keep_logits=True).run(prompt, 80)
    assert off.ids == plain.ids and all(torch.equal(a, b) for a, b in zip(off.logits, plain.logits))


@pytest.mark.parametrize("text_beams,sample,cache", [(1, True, True), (3, False, True), (3, False, False)])
def test_guided_logits_equal_two_plain_forwards(text_beams, sample, cache):
    """Every media token's logits are uncond + s * (cond - uncond) of two plain forwards over the
    finished sequences; text tokens', the conditional forward's."""
    model, tok, table = media_model(seed=6, image_bias=4.0, speech_bias=3.0, scale=2.0)
    scales = {IMAGE: 3.0, VIDEO: 2.0, SPEECH: 1.5}
    c = ModalityConstraint(table, max_speech_frames=4)
    prompt, uncond = prompt_ids(tok, PROMPTS[0]), prompt_ids(tok, "a")
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        r = Decoder(model, c, settings_of(text_beams, sample, **scales), model.generation_config.eos_token_id,
                    use_cache=cache, keep_logits=True).run(prompt, 160, seed=0, uncond_ids=uncond)
    finally:
        hook.remove()
    # several media blocks, of every guided mode (speech where text is sampled)
    assert {IMAGE, VIDEO} | ({SPEECH} if sample else set()) <= set(r.modes), r.modes
    if text_beams > 1:
        assert r.beam_phases >= 2  # beam phases in text, between guided blocks
    else:  # forward i scores token i: the unconditional row runs inside guided blocks only
        assert rows == [2 if mode in scales else 1 for mode in r.modes]
    cond = plain_logits(model, prompt + r.ids)  # (L, V)
    free = plain_logits(model, uncond + r.ids)
    checked = 0
    for i, (mode, got) in enumerate(zip(r.modes, r.logits)):
        if got is None:  # chosen by a beam phase
            continue
        c_i, u_i = cond[len(prompt) + i - 1], free[len(uncond) + i - 1]
        want = u_i + scales[mode] * (c_i - u_i) if mode in scales else c_i
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (i, mode, float((got - want).abs().max()))
        checked += 1
    assert checked >= sum(m != TEXT for m in r.modes)


@pytest.mark.parametrize("text_beams", [1, 3])
def test_guided_text_equals_unguided_until_the_first_media_block(text_beams):
    model, tok, table = media_model(seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=0.5, scale=2.0)
    gen = Generator.from_loaded(model, tok, table)
    seen = 0
    for prompt in PROMPTS:
        kw = dict(chat=True, max_new_tokens=60, max_speech_frames=4)
        plain = gen.generate(prompt, settings=settings_of(text_beams), **kw).result
        guided = gen.generate(prompt, settings=settings_of(text_beams, image=3.0, video=3.0, speech=3.0), **kw).result
        first = next((i for i, m in enumerate(plain.modes) if m != TEXT), len(plain.modes))
        # modes[i]: the mode token i was chosen in; the block's start token is chosen in text
        assert guided.ids[:first] == plain.ids[:first] and guided.modes[:first] == plain.modes[:first]
        seen += first < len(plain.modes) and guided.ids[first:] != plain.ids[first:]
    assert seen >= 2  # guidance changed what follows in several answers


@pytest.mark.parametrize("sample", [False, True])
def test_guided_batch_equals_single_runs(sample):
    model, tok, table = media_model(seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=2.6, scale=2.0)
    gen = Generator.from_loaded(model, tok, table)
    kw = dict(chat=True, settings=settings_of(1, sample, image=3.0, video=2.0, speech=2.0), max_new_tokens=48,
              max_speech_frames=4, negative_prompt="blurry")
    seeds = [21, 22, 23, 24, 25]
    batch = gen.generate_batch(PROMPTS, seed=seeds, **kw)
    alone = [gen.generate(p, seed=s, **kw) for p, s in zip(PROMPTS, seeds)]
    assert [b.result.ids for b in batch] == [a.result.ids for a in alone]
    modes = {m for a in alone for m in a.result.modes}
    assert IMAGE in modes and (SPEECH if sample else VIDEO) in modes
    assert len({len(a.result.ids) for a in alone}) > 1  # rows left the batch at different steps


def test_the_unconditional_branch():
    """Chat: the system prompt and a user turn of the negative prompt only (a pair task's wording with
    its condition emptied); raw: the negative prompt; a prompt ending in an open block lends the
    block's start to both branches."""
    model, tok, table = media_model(seed=1)
    gen = Generator.from_loaded(model, tok, table)
    turns = gen.prompt_turns("a cat")
    text = tok.decode(gen.renderer(gen.unconditional_segments(turns, True, None, "blurry")).input_ids)
    assert "blurry" in text and "a cat" not in text and text.endswith("<|im_start|>assistant\n")
    assert text.count("<|im_start|>user\n") == 1 and "You are MIO" in text
    assert gen.unconditional_segments(turns, False, None, None) == []
    # A generation pair task's wording: the condition emptied in place (or the negative prompt), which is
    # what condition dropout trains -- the prompt of a dropped sample, token for token.
    for templates in (PAPER, MIO_RELEASE):
        wording = templates.pair_tasks["descriptive_image_generation"]
        asked = gen.prompt_turns(wording.replace("{text}", "a cat on a mat"))
        assert gen.unconditional_segments(asked, True, None, "blurry")[-3].text == wording.replace("{text}", "blurry")
        uncond = gen.renderer(gen.unconditional_segments(asked, True, None, None)).input_ids
        image = Image(np.arange(32))
        dropped = TrainingRenderer(tok, table)(StoredSample("k", "image_text", [image, Text("a cat on a mat")]),
                                       DatasetSpec("d", format="sft", tasks=["descriptive_image_generation"],
                                                   templates=templates.name, cond_dropout={"image_generation": 1.0}),
                                       random.Random(0))
        assert dropped.input_ids[:uncond.size].tolist() == uncond.tolist()
        assert int(dropped.input_ids[uncond.size]) == table.image_begin  # then the answer: the image
    c = ModalityConstraint(table)
    prompt = np.asarray(prompt_ids(tok, "draw") + [table.image_begin, table.image_start + 5])
    ids = gen._unconditional_ids(c, prompt, [], 0)
    assert ids.tolist()[-2:] == [table.image_begin, table.image_start + 5]
    assert c.state(ids).kind == IMAGE and c.state(ids).count == 1


def test_guidance_settings():
    assert all(not s.guided for p in ("paper", "mio-release") for task in PRESETS[p].tasks.values()
               for s in task.values())
    guided = get_preset("guided").settings("any")
    assert guided[IMAGE].guidance == 3.0 and guided[IMAGE].top_k == 2000 and guided[VIDEO].guided
    assert not guided[TEXT].guided and not guided[SPEECH].guided
    assert resolve_settings(overrides_from_strings(["image.guidance=3"]))[IMAGE].guidance == 3.0
    every = resolve_settings(overrides_from_strings(["all.guidance=2"]))
    assert {m: s.guidance for m, s in every.items()} == {TEXT: 1.0, IMAGE: 2.0, VIDEO: 2.0, SPEECH: 2.0}
    with pytest.raises(ValueError, match="text.guidance is 2.0: guidance applies inside media blocks only"):
        resolve_settings({TEXT: {"guidance": 2.0}})
    release = get_preset("mio-release").settings("image_generation")  # 5 beams everywhere
    with pytest.raises(ValueError, match="image decoding settings: beam search with guidance is not supported"):
        resolve_settings({IMAGE: {"guidance": 3.0}}, release)
    assert resolve_settings({IMAGE: {"guidance": 3.0, "num_beams": 1}}, release)[IMAGE].guided
    with pytest.raises(ValueError, match="guidance must be positive"):
        DecodeSettings(guidance=0.0)
    model, tok, table = media_model(seed=1)
    dec = Decoder(model, ModalityConstraint(table), settings_of(image=3.0), [tok.eos_token_id])
    with pytest.raises(ValueError, match="no unconditional prompt was given"):
        dec.run(prompt_ids(tok, "a cat"), 4)


@pytest.mark.slow
def test_guidance_through_mio_generate_and_mio_eval(tmp_path, capsys, evalset):  # noqa: F811 (the fixture)
    """`mio generate --set image.guidance=3 --negative-prompt ...` gives the Generator API's answer;
    `mio eval --set image.guidance=3` decodes its image task guided (and differently from 1)."""
    from mio.cli import main

    folder = save_media_model(tmp_path / "model", seed=9, image_bias=3.0, speech_bias=3.0, scale=2.0)
    out = tmp_path / "answer"
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--outputs", "image", "--out", str(out),
            "--set", "image.guidance=3", "--set", "image.do_sample=false", "--negative-prompt", "blurry",
            "--max-new-tokens", "40", "--steps", "1"]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "generation.json").read_text())
    assert record["settings"]["image"]["guidance"] == 3.0
    gen = Generator(folder)
    api = gen.generate("a cat", outputs=["image"], settings={"image": {"guidance": 3.0, "do_sample": False}},
                       negative_prompt="blurry", max_new_tokens=40)
    assert record["new_ids"] == api.result.ids and IMAGE in api.result.modes
    unguided = gen.generate("a cat", outputs=["image"], settings={"image": {"do_sample": False}}, max_new_tokens=40)
    assert unguided.result.ids != api.result.ids
    scores = {}  # the image task's decoded answers at guidance 1 and 3
    clip = tiny_clip_folder(tmp_path / "clip")  # a CLIP score needs the image decoded
    for scale in ("1", "3"):
        code = main(["eval", str(folder), "--data", *map(str, evalset), "--tasks", "image_generation", "--out",
                     str(tmp_path / f"eval{scale}"), "--max-new-tokens", "40", "--steps", "1", "--clip-model", str(clip),
                     "--set", "all.num_beams=1", "--set", "all.do_sample=false", "--set", f"image.guidance={scale}"])
        assert code == 0
        capsys.readouterr()
        rows = [json.loads(line) for line in (tmp_path / f"eval{scale}" / "generations.jsonl").read_text().splitlines()]
        scores[scale] = [(tmp_path / f"eval{scale}" / r["media"][0]).read_bytes() for r in rows]
    assert len(scores["3"]) == 1 and scores["3"] != scores["1"]  # the decoded images differ
