"""`mio bench serve`: what continuous batching gives `mio serve`, measured in one run on the tiny
model: the same chat requests from 32 concurrent clients and one at a time, and a short request
behind long ones.

The model is the tiny default backbone (random weights) extended with mio's tokens, served by a
real uvicorn server in this process (one torch thread), its clients speaking HTTP from threads.
Requests are greedy text answers (``temperature: 0``), so the concurrent answers are the same
tokens as the one-at-a-time ones (the tests hold them equal) and both runs do the same work.

- ``throughput_ratio``: new tokens per second with ``clients`` concurrent clients over the same
  requests sent one at a time. Target: at least 4.
- ``p50_latency_s``, ``p99_latency_s``: of the concurrent requests (``alone_p50_latency_s``: the
  same requests one at a time).
- ``short_behind_long``: the latency of a ``short_tokens`` request sent while ``long_requests``
  requests of ``long_tokens`` decode, over its latency on an idle server (median of ``repeats``
  each). Target: at most 3, which only a batch that takes newcomers at the next step meets.
  ``long_new_tokens``: what the long requests made (a random model may stop early).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import torch

from mio.generate.generator import Generator
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone
from mio.serve.app import ServeConfig, create_app, serve_in_thread
from mio.serve.limits import ServeLimits
from mio.templates import PRETRAIN_TEMPLATES, SYSTEM_STANDARD

CORPUS = [*PRETRAIN_TEMPLATES.values(), SYSTEM_STANDARD, "a cat sitting on a mat", "a red rocket on the launch pad",
          "coffee in a white cup"] * 8
PROMPTS = ["a cat sitting on a mat", "a red rocket on the launch pad", "coffee in a white cup", "hello world",
           "Please describe the following video", "transcribe this speech", "generate an image", "hi"]


def bench_serve(clients: int = 32, new_tokens: int = 48, short_tokens: int = 8, long_tokens: int = 256,
                long_requests: int = 8, repeats: int = 3) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="mio-bench-serve-") as tmp:
            base = build_tiny_backbone(CORPUS, TinyLlamaConfig(), tmp)
            model, tok, table = load_backbone(base, extend=True)
            gen = Generator.from_loaded(model.eval(), tok, table, name="tiny", device="cpu")
            limits = ServeLimits(max_queue=max(64, 2 * clients))
            with serve_in_thread(create_app(gen, ServeConfig(limits))) as url, httpx.Client(timeout=600) as http:
                return _measure(url, http, clients, new_tokens, short_tokens, long_tokens, long_requests, repeats)
    finally:
        torch.set_num_threads(threads)


def _request(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}


def _ask(http: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, int]:
    """(seconds, new tokens) of one request."""
    t0 = time.perf_counter()
    r = http.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])


def _measure(url: str, http: httpx.Client, clients: int, new_tokens: int, short_tokens: int, long_tokens: int,
             long_requests: int, repeats: int) -> dict[str, Any]:
    bodies = [_request(f"{PROMPTS[i % len(PROMPTS)]} {i}", new_tokens) for i in range(clients)]
    _ask(http, url, bodies[0])  # warm-up: first-use caches, allocator
    t0 = time.perf_counter()
    alone = [_ask(http, url, b) for b in bodies]
    alone_s = time.perf_counter() - t0
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        together = list(pool.map(lambda b: _ask(http, url, b), bodies))
        together_s = time.perf_counter() - t0
    tokens = sum(n for _, n in alone)
    if tokens != sum(n for _, n in together):
        raise RuntimeError("the concurrent answers are not the one-at-a-time ones: the bench compares unequal work")
    latencies = np.array([s for s, _ in together])

    short = _request("hello world", short_tokens)
    idle = statistics.median(_ask(http, url, short)[0] for _ in range(repeats))
    busy, long_made = [], []
    for r in range(repeats):
        with ThreadPoolExecutor(long_requests) as pool:
            longs = [pool.submit(_ask, http, url, _request(f"{PROMPTS[i % len(PROMPTS)]} long {r} {i}", long_tokens))
                     for i in range(long_requests)]
            time.sleep(0.5)  # the long requests arrive and their prompts are read: they are decoding
            busy.append(_ask(http, url, short)[0])
            long_made += [f.result()[1] for f in longs]
    return {"clients": clients, "new_tokens_per_request": new_tokens, "new_tokens": tokens,
            "throughput_ratio": round(alone_s / together_s, 2),
            "tokens_per_s_concurrent": round(tokens / together_s, 1), "tokens_per_s_alone": round(tokens / alone_s, 1),
            "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_latency_s": round(float(np.percentile(latencies, 99)), 3),
            "alone_p50_latency_s": round(float(np.percentile([s for s, _ in alone], 50)), 3),
            "short_behind_long": round(statistics.median(busy) / idle, 2),
            "short_idle_s": round(idle, 3), "short_busy_s": round(statistics.median(busy), 3),
            "long_new_tokens": int(np.median(long_made)), "torch_threads": torch.get_num_threads()}

