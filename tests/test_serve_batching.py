"""Continuous batching: the one decoding loop (`Decoder.start` / `step`), as `mio serve` runs it.

- a sequence that starts while others decode joins at the next step and finishes before them;
  every answer is the one it gets alone (greedy, seeded sampling, beams; other outputs allowed);
- a cancelled sequence leaves the batch at the next step (the model sees one row fewer);
- through the server: concurrent requests (greedy and seeded sampling, different outputs) get
  the answers the same requests get one at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_support import model_folder, running
from test_generate_support import media_model, one_thread  # noqa: F401 (autouse fixture)

from mio.generate.decoding import Decoder
from mio.generate.generator import Generator

GREEDY = {"all": {"num_beams": 1, "do_sample": False}}
SAMPLED = {"all": {"num_beams": 1, "do_sample": True, "top_p": 0.9}}
BEAMS = {"all": {"num_beams": 1, "do_sample": False}, "text": {"num_beams": 3}}


def prepared(gen: Generator, prompt: str, settings: dict, seed: int, outputs=None, limit: int = 40):
    return gen.prepare_batch([prompt], chat=True, settings=settings, seed=seed, outputs=outputs, max_new_tokens=limit,
                             max_speech_frames=4)[0]


def test_a_newcomer_joins_the_running_batch_and_answers_as_alone():
    model, tok, table = media_model(seed=9, image_bias=3.0, speech_bias=3.0, stop_bias=1.0, scale=2.0)
    gen = Generator.from_loaded(model, tok, table)
    jobs = [("a cat sitting on a mat", GREEDY, 0, None, 60), ("hello world", SAMPLED, 5, None, 50),
            ("transcribe this speech", BEAMS, 0, ("text",), 30), ("hi", SAMPLED, 7, ("image",), 40),
            ("You are MIO", GREEDY, 0, ("speech",), 12)]
    preps = [prepared(gen, *job) for job in jobs]
    alone = [gen.generate(p, chat=True, settings=s, seed=sd, outputs=o, max_new_tokens=n, max_speech_frames=4)
             for p, s, sd, o, n in jobs]
    dec = Decoder(model)
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        seqs = [dec.start(p.ids, p.max_new_tokens, p.seed, p.settings, p.constraint, p.stop_ids) for p in preps[:2]]
        for _ in range(5):
            dec.step()
        seqs += [dec.start(p.ids, p.max_new_tokens, p.seed, p.settings, p.constraint, p.stop_ids) for p in preps[2:]]
        joined_at = len(rows_seen)
        order = []
        while dec.busy:
            order += [id(s) for s in dec.step()]
    finally:
        hook.remove()
    got = [gen.finish(p, s.result) for p, s in zip(preps, seqs)]
    assert [g.result.ids for g in got] == [a.result.ids for a in alone]
    assert [g.segments for g in got] == [a.segments for a in alone]
    # The newcomers joined the running batch at once (the first step after their start fed them
    # beside the two running rows), and the short one finished while the first one still ran.
    assert rows_seen[joined_at] >= 2 + 3
    assert order.index(id(seqs[4])) < order.index(id(seqs[0])) and len(got[0].result.ids) > 5 + len(got[4].result.ids)
    assert {m for g in got for m in g.result.modes} >= {"text", "image", "speech"}


def test_a_cancelled_sequence_leaves_at_the_next_step():
    model, tok, table = media_model(seed=9)
    gen = Generator.from_loaded(model, tok, table)
    preps = [prepared(gen, p, SAMPLED, i, limit=60) for i, p in enumerate(["a cat", "hello world", "hi"])]
    dec = Decoder(model)
    seqs = [dec.start(p.ids, p.max_new_tokens, p.seed, p.settings, p.constraint, p.stop_ids) for p in preps]
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        for _ in range(3):
            dec.step()
        made = len(seqs[1].result.ids)
        dec.cancel(seqs[1])
        ended = dec.step()
    finally:
        hook.remove()
    assert ended == [seqs[1]] and len(seqs[1].result.ids) == made  # left as it stood
    assert rows_seen[-2:] == [3, 2]
    while dec.busy:
        dec.step()
    alone = gen.generate("hi", chat=True, settings=SAMPLED, seed=2, max_new_tokens=60, max_speech_frames=4)
    assert seqs[2].result.ids == alone.result.ids


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    gen = Generator(model_folder(tmp_path_factory.mktemp("serve")), device="cpu")
    with running(gen) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_concurrent_requests_get_their_one_at_a_time_answers(client):
    requests = [dict(messages=[{"role": "user", "content": p}], max_tokens=n, seed=sd, modalities=m, **kw)
                for p, n, sd, m, kw in [
                    ("a cat sitting on a mat", 40, 0, ["text"], {"temperature": 0}),
                    ("hello world", 30, 11, ["text"], {"temperature": 1.0, "top_p": 0.9}),
                    ("please generate an image of", 40, 3, ["image"], {"temperature": 1.0}),
                    ("hi", 50, 4, ["text", "image"], {"temperature": 0.8}),
                    ("transcribe this speech", 20, 0, ["text"], {"extra_body": {"set": ["all.num_beams=1",
                                                                                         "all.do_sample=false"]}}),
                    ("You are MIO", 40, 5, ["audio"], {"temperature": 1.0, "extra_body": {"max_speech_frames": 4}}),
                ]]

    def ask(kw):
        r = client.chat.completions.create(model="model", **kw).choices[0]
        return r.message.content, r.message.audio.data if r.message.audio else None, r.finish_reason

    alone = [ask(kw) for kw in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert any(isinstance(c, list) for c, _, _ in alone) and any(a for _, a, _ in alone)  # images and speech among them


def test_padding_counts_the_columns_a_join_adds():
    """A newcomer's prompt pads every other row by its length: the engine stops taking newcomers
    past mio.serve.engine.MAX_PADDING such columns, until the batch empties and starts afresh."""
    model, tok, table = media_model(seed=9)
    gen = Generator.from_loaded(model, tok, table)
    long, short = (prepared(gen, p, GREEDY, 0, limit=30) for p in ("a cat sitting on a mat " * 4, "hi"))
    dec = Decoder(model)
    first = dec.start(long.ids, long.max_new_tokens, 0, long.settings, long.constraint, long.stop_ids)
    for _ in range(3):
        dec.step()
    assert dec.padding == 0  # one row: every column is its own
    dec.start(short.ids, short.max_new_tokens, 0, short.settings, short.constraint, short.stop_ids)
    dec.step()
    assert len(long.ids) + len(first.result.ids) > len(short.ids)
    assert dec.padding == len(short.ids) - 1  # the first row's step was as long as the newcomer's prompt
    while dec.busy:
        dec.step()
    assert dec.padding == 0


def test_a_client_that_goes_away_leaves_the_batch(tmp_path):
    """A stream closed after its first chunk, and a plain request whose client times out: both jobs
    end (the engine has no open job) long before their token limits, counted in forward passes."""
    import httpx

    from mio.serve.app import create_app, serve_in_thread

    gen = Generator(model_folder(tmp_path), device="cpu")
    app = create_app(gen)
    engine = app.state.served.engine
    forwards: list[int] = []
    hook = gen.model.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
    body = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "modalities": ["image"],
            "max_tokens": 900, "seed": 1}
    try:
        with serve_in_thread(app) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
                next(r.iter_lines())
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
            for _ in range(200):
                if engine.open_jobs == 0:
                    break
                threading.Event().wait(0.05)
            assert engine.open_jobs == 0
    finally:
        hook.remove()
    assert len(forwards) < 900  # alone, each answer runs 882 forwards (to the positions' limit)
