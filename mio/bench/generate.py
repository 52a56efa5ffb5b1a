"""`mio bench generate`: what the modality constraint and the KV cache cost or save, on the
tiny model, measured in one run on one CPU thread.

The model is the tiny default backbone (random weights) extended with mio's 12,294 tokens.
Each figure is new tokens per second of transformers' ``model.generate`` over three prompts
(ending in text, inside an open ``<image>`` and inside an open ``<spch>``, so that every state
of the grammar is timed), with a fixed number of new tokens (``min_new_tokens`` keeps all runs
the same length). Runs of the variants alternate and each keeps its median, so a busy machine
slows all of them alike.

- ``constraint_overhead``: 1 - constrained / plain tokens per second, sampling with Table 8's
  media settings (top-p 0.7); ``beam5_constraint_overhead`` the same with text's 5 beams.
  Target: at most 0.10.
- ``kv_cache_speedup``: tokens per second with the KV cache over without it (constrained).
- ``loop_tokens_per_s``: mio's own decoding loop (per-modality settings, same sampling
  settings) and ``loop_vs_plain``: its speed as a fraction of plain ``model.generate``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import Decoder
from mio.generate.settings import MODES, TABLE8, DecodeSettings
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone
from mio.templates import PRETRAIN_TEMPLATES, SYSTEM_SPEECH, SYSTEM_STANDARD

CORPUS = [*PRETRAIN_TEMPLATES.values(), SYSTEM_STANDARD, SYSTEM_SPEECH,
          "a cat sitting on a mat", "a red rocket on the launch pad", "coffee in a white cup"] * 8


def _race(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per variant, the variants' runs interleaved."""
    for fn in variants.values():  # warm-up: allocator, kernels, first-call caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_generate(new_tokens: int = 96, repeats: int = 3, beam_tokens: int = 32) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="mio-bench-generate-") as tmp:
            base = build_tiny_backbone(CORPUS, TinyLlamaConfig(), tmp)
            model, tok, table = load_backbone(base, extend=True)
            return _measure(model.eval(), tok, table, new_tokens, repeats, beam_tokens)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _measure(model: Any, tok: Any, table: Any, new_tokens: int, repeats: int, beam_tokens: int) -> dict[str, Any]:
    text = [tok.bos_token_id, *tok("Please generate an image of a cat sitting on a mat")["input_ids"]]
    prompts = [torch.tensor([p]) for p in (text, text + [table.image_begin], text + [table.speech_begin])]
    constraint = ModalityConstraint(table)
    sample = TABLE8["image"]
    beam = TABLE8["text"]

    def hf(settings: DecodeSettings, n: int, constrained: bool, cache: bool = True) -> Callable[[], None]:
        def run() -> None:
            for p in prompts:
                torch.manual_seed(0)
                model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                               logits_processor=[constraint] if constrained else None, use_cache=cache,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **settings.generate_kwargs())
        return run

    loop = Decoder(model, constraint, {m: sample for m in MODES}, stop_ids=[], use_cache=True)

    def ours() -> None:
        for p in prompts:
            loop.run(p[0].numpy(), new_tokens, seed=0)

    total = new_tokens * len(prompts)
    t = _race({"plain": hf(sample, new_tokens, False), "constrained": hf(sample, new_tokens, True), "loop": ours}, repeats)
    tb = _race({"plain": hf(beam, beam_tokens, False), "constrained": hf(beam, beam_tokens, True)}, max(repeats // 2, 1))
    tc = _race({"cache": hf(sample, new_tokens, True, cache=True), "no_cache": hf(sample, new_tokens, True, cache=False)},
               max(repeats // 2, 1))
    return {
        "part": "generate",
        "model": f"tiny Llama (hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
                 f"vocabulary {model.config.vocab_size}), random weights, CPU, 1 thread",
        "new_tokens_per_prompt": new_tokens,
        "prompts": len(prompts),
        "tokens_per_s_plain": round(total / t["plain"], 1),
        "tokens_per_s_constrained": round(total / t["constrained"], 1),
        "constraint_overhead": round(1 - t["plain"] / t["constrained"], 4),
        "beam5_tokens_per_s_plain": round(beam_tokens * len(prompts) / tb["plain"], 1),
        "beam5_tokens_per_s_constrained": round(beam_tokens * len(prompts) / tb["constrained"], 1),
        "beam5_constraint_overhead": round(1 - tb["plain"] / tb["constrained"], 4),
        "tokens_per_s_cache": round(total / tc["cache"], 1),
        "tokens_per_s_no_cache": round(total / tc["no_cache"], 1),
        "kv_cache_speedup": round(tc["no_cache"] / tc["cache"], 2),
        "loop_tokens_per_s": round(total / t["loop"], 1),
        "loop_vs_plain": round(t["plain"] / t["loop"], 3),
        "target_constraint_overhead_max": 0.10,
    }
