"""Batched generation: the one decoding loop over several sequences at once.

- greedy answers of a batch equal the same prompts run one at a time (prompts of different
  lengths: left padding; rows entering media blocks and beam phases at different steps);
- sampling is seeded per row: a row's answer does not depend on its batch;
- a finished row leaves the batch (the model sees fewer rows), with and without the KV cache.
"""

from __future__ import annotations

import pytest
from test_generate_support import media_model, one_thread  # noqa: F401 (autouse fixture)

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import STOP, Decoder
from mio.generate.generator import Generator
from mio.generate.settings import MODES, DecodeSettings

PROMPTS = ["a cat", "hello world, please generate an image of a cat sitting on a mat", "transcribe this speech",
           "hi", "You are MIO, an AI assistant"]


def greedy(beams: int = 1) -> dict[str, dict]:
    return {"all": {"num_beams": 1, "do_sample": False}, "text": {"num_beams": beams, "do_sample": False}}


@pytest.mark.parametrize("beams", [1, 3])
def test_greedy_batch_equals_one_at_a_time(beams):
    model, tok, table = media_model(seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=2.6, scale=2.0)
    gen = Generator.from_loaded(model, tok, table)
    kw = dict(chat=False, settings=greedy(beams), max_new_tokens=48, max_speech_frames=4)
    batch = gen.generate_batch(PROMPTS, **kw)
    alone = [gen.generate(p, **kw) for p in PROMPTS]
    assert [b.result.ids for b in batch] == [a.result.ids for a in alone]
    assert [b.result.modes for b in batch] == [a.result.modes for a in alone]
    assert [b.segments for b in batch] == [a.segments for a in alone]
    modes = {m for a in alone for m in a.result.modes}
    assert {"text", "image", "speech"} <= modes  # rows were in different blocks at the same steps
    assert len({len(a.result.ids) for a in alone}) > 1  # and finished at different steps
    if beams > 1:
        assert all(a.result.beam_phases >= 1 for a in alone)


def test_sampling_is_seeded_per_row():
    model, tok, table = media_model(seed=6, image_bias=3.0, speech_bias=3.0, stop_bias=1.0)
    gen = Generator.from_loaded(model, tok, table)
    kw = dict(chat=True, settings={"all": {"num_beams": 1, "do_sample": True, "top_p": 0.9}}, max_new_tokens=40,
              max_speech_frames=4)
    seeds = [11, 12, 13, 14, 15]
    batch = gen.generate_batch(PROMPTS, seed=seeds, **kw)
    for p, s, b in zip(PROMPTS, seeds, batch):
        assert gen.generate(p, seed=s, **kw).result.ids == b.result.ids
    other = gen.generate_batch([PROMPTS[3], PROMPTS[1]], seed=[seeds[3], seeds[1]], **kw)  # another batch
    assert [o.result.ids for o in other] == [batch[3].result.ids, batch[1].result.ids]
    assert len({tuple(b.result.ids) for b in batch}) == len(PROMPTS)
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate_batch(PROMPTS, seed=[1, 2], **kw)


@pytest.mark.parametrize("cache", [True, False])
def test_a_finished_row_leaves_the_batch(cache):
    """The model's input shrinks as rows stop; the rows' tokens are those of runs alone."""
    model, tok, table = media_model(seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=2.6, scale=2.0)
    c = ModalityConstraint(table)
    settings = {m: DecodeSettings(do_sample=False) for m in MODES}
    dec = Decoder(model, c, settings, model.generation_config.eos_token_id, use_cache=cache)
    prompts = [[tok.bos_token_id, *tok(p)["input_ids"]] for p in PROMPTS]
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        results = dec.run_batch(prompts, 40, seeds=[0] * len(prompts))
    finally:
        hook.remove()
    alone = [Decoder(model, c, settings, model.generation_config.eos_token_id, use_cache=cache).run(p, 40)
             for p in prompts]
    assert [r.ids for r in results] == [a.ids for a in alone]
    assert any(r.stopped == STOP for r in results) and len({len(r.ids) for r in results}) > 1
    # A row of n new tokens takes part in n forwards (the prompt's, then one after each token
    # but its last): forward f has as many rows as sequences longer than f tokens.
    lengths = [len(r.ids) for r in results]
    assert rows_seen == [sum(n > f for n in lengths) for f in range(max(lengths))]
    assert [r.forward_passes for r in results] == lengths


def test_cli_prompts_file_in_batches(tmp_path, capsys):
    """`mio generate --prompts FILE --batch-size N`: each answer in its folder, equal to the
    prompt generated alone; bad lines are named."""
    import json

    from test_generate_support import save_media_model

    from mio.generate.cli import generate_main, prompts_file

    folder = save_media_model(tmp_path / "model", seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=2.6, scale=2.0)
    lines = [{"prompt": "What is this?", "id": "cat"}, {"prompt": "hello world"}, {"prompt": "a cat"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--model", str(folder), "--max-new-tokens", "24", "--set", "all.num_beams=1", "--set", "all.do_sample=false",
            "--outputs", "text"]
    assert generate_main(args + ["--prompts", str(tmp_path / "p.jsonl"), "--batch-size", "2",
                                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    names = ["cat", "0002", "0003"]
    assert [line.split("transcript: ")[1] for line in printed.splitlines() if line.startswith("transcript: ")] == [
        str(tmp_path / "out" / n / "transcript.md") for n in names]
    gen = Generator(folder)
    for (_, items), n in zip(prompts_file(tmp_path / "p.jsonl"), names):
        alone = gen.generate(items, max_new_tokens=24, settings=greedy(), outputs=["text"])
        assert json.loads((tmp_path / "out" / n / "generation.json").read_text())["new_ids"] == alone.result.ids
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y", "image": ["missing.jpg"]}\n')
    assert generate_main(args + ["--prompts", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: image file" in capsys.readouterr().err
    assert generate_main(args + ["--prompts", str(tmp_path / "p.jsonl"), "--prompt", "x", "--out", "o3"]) == 2
    assert "not both" in capsys.readouterr().err
