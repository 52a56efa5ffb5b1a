"""`mio bench generate`: what the modality constraint and the KV cache cost or save, on the
tiny model, measured in one run on one CPU thread.

The model is the tiny default backbone (random weights) extended with mio's 12,294 tokens.
Each figure is new tokens per second of transformers' ``model.generate`` over three prompts
(ending in text, inside an open ``<image>`` and inside an open ``<spch>``, so that every state
of the grammar is timed), with a fixed number of new tokens (``min_new_tokens`` keeps all runs
the same length). Runs of the variants alternate and each keeps its fastest; ratios use the CPU
time of this process (one thread), which other processes on a busy machine barely disturb,
where wall-clock ratios there swung by 30% between identical runs.

- ``constraint_overhead``: 1 - constrained / plain tokens per second, sampling with Table 8's
  media settings (top-p 0.7); ``beam5_constraint_overhead`` the same with text's 5 beams.
  Target: at most 0.10. ``constraint_time_share``: the part of a constrained run's wall time
  spent inside the constraint, timed around each call -- the same cost measured within one
  run, which a busy machine cannot blur.
- ``kv_cache_speedup``: tokens per second with the KV cache over without it (constrained), after
  a ``context_tokens`` context (``kv_cache_speedup_short_prompt``: after the short prompts alone,
  where a tiny model's per-step overhead hides most of the saving).
- ``loop_tokens_per_s``: mio's own decoding loop (per-modality settings, same sampling
  settings) and ``loop_vs_plain``: its speed as a fraction of plain ``model.generate``.
- ``batched_speedup``: new tokens per second of mio's loop over 8 prompts (of different lengths,
  ending in text, inside ``<image>`` and inside ``<spch>``) decoded as one batch, over the same
  prompts one at a time; greedy, as ``mio eval`` decodes. Target: at least 4.
  ``batched_speedup_sampled``: the same with Table 8's media sampling (top-p 0.7): each row's
  top-p sort and multinomial draw over the whole vocabulary are transformers' own, per row and
  with the row's own generator (so a row's tokens do not depend on its batch), and they cost
  as much in a batch as alone. ``batched_constraint_overhead``: 1 - constrained / plain tokens
  per second of transformers' ``model.generate`` on the 8 prompts left-padded as one batch
  (sampling). Target: at most 0.10.
- ``guidance_cost_media``: CPU time per image token of mio's loop with classifier-free guidance
  (the ``guided`` preset's image settings: guidance 3, top-k 2000) over the same settings at
  guidance 1, decoding image codes after prompts that end inside ``<image>``: the guided
  sequence's unconditional row doubles the model's batch. Target: at most 2.2.
  ``guidance_cost_text``: the same for text tokens of a guided answer (a constraint that allows
  text only, image guidance 3): the unconditional row is in the batch only inside guided blocks,
  so text costs what it costs unguided. Target: at most 1.1.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from typing import Any, Callable

import torch
from transformers import LogitsProcessor

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import Decoder
from mio.generate.settings import GUIDED_MEDIA, MODES, TABLE8, DecodeSettings
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone
from mio.templates import PRETRAIN_TEMPLATES, SYSTEM_SPEECH, SYSTEM_STANDARD

CORPUS = [*PRETRAIN_TEMPLATES.values(), SYSTEM_STANDARD, SYSTEM_SPEECH,
          "a cat sitting on a mat", "a red rocket on the launch pad", "coffee in a white cup"] * 8


def _race(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Per variant, the fastest of ``repeats`` runs in CPU seconds of this process and in wall
    seconds, the variants' runs interleaved."""
    for fn in variants.values():  # warm-up: allocator, kernels, first-call caches
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {k: {"cpu": min(cpu[k]), "wall": min(wall[k])} for k in variants}


class _Timed(LogitsProcessor):
    """The constraint, with the wall time spent inside it added up."""

    def __init__(self, inner: LogitsProcessor) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.seconds += time.perf_counter() - start
        return out


def _time_share(hf: Callable[..., Callable[[], None]], settings: DecodeSettings, n: int, constraint: Any) -> float:
    """The part of one constrained run's wall time spent inside the constraint."""
    timed = _Timed(constraint)
    start = time.perf_counter()
    hf(settings, n, True, processor=timed)()
    return timed.seconds / (time.perf_counter() - start)


def bench_generate(new_tokens: int = 64, repeats: int = 5, beam_tokens: int = 24, context_tokens: int = 512) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="mio-bench-generate-") as tmp:
            base = build_tiny_backbone(CORPUS, TinyLlamaConfig(), tmp)
            model, tok, table = load_backbone(base, extend=True)
            return _measure(model.eval(), tok, table, new_tokens, repeats, beam_tokens, context_tokens)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _measure(model: Any, tok: Any, table: Any, new_tokens: int, repeats: int, beam_tokens: int,
             context_tokens: int) -> dict[str, Any]:
    text = [tok.bos_token_id, *tok("Please generate an image of a cat sitting on a mat")["input_ids"]]
    prompts = [torch.tensor([p]) for p in (text, text + [table.image_begin], text + [table.speech_begin])]
    constraint = ModalityConstraint(table)
    sample = TABLE8["image"]
    beam = TABLE8["text"]

    # A long context (an SFT conversation with media is hundreds to thousands of tokens) for the cache.
    context = torch.randint(3, table.text_size, (1, context_tokens), generator=torch.Generator().manual_seed(0))
    long_prompts = [torch.cat([context, p], 1) for p in prompts]

    def hf(settings: DecodeSettings, n: int, constrained: bool, cache: bool = True,
           processor: LogitsProcessor | None = None, long: bool = False) -> Callable[[], None]:
        def run() -> None:
            for p in long_prompts if long else prompts:
                torch.manual_seed(0)
                model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                               logits_processor=[processor or constraint] if constrained else None, use_cache=cache,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **settings.generate_kwargs())
        return run

    loop = Decoder(model, constraint, {m: sample for m in MODES}, stop_ids=[], use_cache=True)
    batched = _measure_batched(model, tok, table, constraint, new_tokens, repeats)

    def ours() -> None:
        for p in prompts:
            loop.run(p[0].numpy(), new_tokens, seed=0)

    total = new_tokens * len(prompts)
    t = _race({"plain": hf(sample, new_tokens, False), "constrained": hf(sample, new_tokens, True), "loop": ours}, repeats)
    tb = _race({"plain": hf(beam, beam_tokens, False), "constrained": hf(beam, beam_tokens, True)}, repeats)
    tc = _race({"cache": hf(sample, new_tokens, True, cache=True), "no_cache": hf(sample, new_tokens, True, cache=False)},
               repeats)
    tl = _race({"cache": hf(sample, new_tokens, True, cache=True, long=True),
                "no_cache": hf(sample, new_tokens, True, cache=False, long=True)}, max(repeats // 2, 1))
    beam_total = beam_tokens * len(prompts)
    share = {name: _time_share(hf, settings, n, constraint) for name, settings, n in
             (("sample", sample, new_tokens), ("beam5", beam, beam_tokens))}
    return {
        "part": "generate",
        "model": f"tiny Llama (hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
                 f"vocabulary {model.config.vocab_size}), random weights, CPU, 1 thread",
        "new_tokens_per_prompt": new_tokens,
        "prompts": len(prompts),
        "timing": f"fastest of {repeats} interleaved runs; ratios from this process's CPU time",
        "tokens_per_s_plain": round(total / t["plain"]["wall"], 1),
        "tokens_per_s_constrained": round(total / t["constrained"]["wall"], 1),
        "constraint_overhead": round(1 - t["plain"]["cpu"] / t["constrained"]["cpu"], 4),
        "constraint_time_share": round(share["sample"], 4),
        "beam5_tokens_per_s_plain": round(beam_total / tb["plain"]["wall"], 1),
        "beam5_tokens_per_s_constrained": round(beam_total / tb["constrained"]["wall"], 1),
        "beam5_constraint_overhead": round(1 - tb["plain"]["cpu"] / tb["constrained"]["cpu"], 4),
        "beam5_constraint_time_share": round(share["beam5"], 4),
        "context_tokens": context_tokens,
        "tokens_per_s_cache": round(total / tl["cache"]["wall"], 1),
        "tokens_per_s_no_cache": round(total / tl["no_cache"]["wall"], 1),
        "kv_cache_speedup": round(tl["no_cache"]["cpu"] / tl["cache"]["cpu"], 2),
        "kv_cache_speedup_short_prompt": round(tc["no_cache"]["cpu"] / tc["cache"]["cpu"], 2),
        "loop_tokens_per_s": round(total / t["loop"]["wall"], 1),
        "loop_vs_plain": round(t["plain"]["cpu"] / t["loop"]["cpu"], 3),
        "target_constraint_overhead_max": 0.10,
        **batched,
        "target_batched_speedup_min": 4.0,
        **_measure_guidance(model, tok, table, new_tokens, repeats),
        "target_guidance_cost_media_max": 2.2,
        "target_guidance_cost_text_max": 1.1,
    }


def _decode_each(loop: Decoder, prompts: list[list[int]], n: int, uncond: list[int]) -> None:
    for p in prompts:
        loop.run(p, n, seed=0, uncond_ids=uncond)


def _measure_guidance(model: Any, tok: Any, table: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Guided over unguided CPU time per token of mio's loop, inside image blocks and in text."""
    texts = BATCH_TEXTS[:3]
    uncond = [tok.bos_token_id]
    unguided = dataclasses.replace(GUIDED_MEDIA, guidance=1.0)
    figures: dict[str, Any] = {}
    for name, end, constraint, n in (
            ("media", [table.image_begin], ModalityConstraint(table), 32),  # exactly one image's codes
            ("text", [], ModalityConstraint(table, allow_image=False, allow_speech=False), new_tokens)):
        prompts = [[tok.bos_token_id, *tok(t)["input_ids"], *end] for t in texts]
        runs = {}
        for label, image in (("unguided", unguided), ("guided", GUIDED_MEDIA)):
            settings = {**{m: DecodeSettings(top_p=1.0, top_k=2000) for m in MODES}, "image": image}
            loop = Decoder(model, constraint, settings, stop_ids=[], use_cache=True)
            runs[label] = functools.partial(_decode_each, loop, prompts, n, uncond + end)
        t = _race(runs, repeats)
        figures[f"guidance_cost_{name}"] = round(t["guided"]["cpu"] / t["unguided"]["cpu"], 3)
    return figures


BATCH_TEXTS = ["Please generate an image of a cat sitting on a mat", "a red rocket", "coffee in a white cup",
               "hello", "Please describe the following video", "a cat sitting on a mat, the caption of this image is",
               "transcribe this speech", "You are MIO, an AI assistant"]


def _measure_batched(model: Any, tok: Any, table: Any, constraint: ModalityConstraint, new_tokens: int,
                     repeats: int) -> dict[str, Any]:
    """Batch of 8 against one at a time (mio's loop), and the constraint's cost in a batched
    ``model.generate``."""
    ends = ([], [table.image_begin], [table.speech_begin])
    prompts = [[tok.bos_token_id, *tok(t)["input_ids"], *ends[i % 3]] for i, t in enumerate(BATCH_TEXTS)]
    rows = len(prompts)
    figures: dict[str, Any] = {"batch_size": rows}
    for name, settings in (("", DecodeSettings(do_sample=False)), ("_sampled", TABLE8["image"])):
        loop = Decoder(model, constraint, {m: settings for m in MODES}, stop_ids=[], use_cache=True)
        t = _race({"one": lambda loop=loop: [loop.run(p, new_tokens, seed=0) for p in prompts],
                   "batch": lambda loop=loop: loop.run_batch(prompts, new_tokens, seeds=[0] * rows)}, repeats)
        total = new_tokens * rows
        figures[f"batched_tokens_per_s{name}_batch1"] = round(total / t["one"]["wall"], 1)
        figures[f"batched_tokens_per_s{name}_batch{rows}"] = round(total / t["batch"]["wall"], 1)
        figures[f"batched_speedup{name}"] = round(t["one"]["cpu"] / t["batch"]["cpu"], 2)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    sample = TABLE8["image"]

    def hf(constrained: bool) -> Callable[[], None]:
        def run() -> None:
            torch.manual_seed(0)
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           logits_processor=[constraint] if constrained else None, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, **sample.generate_kwargs())
        return run

    t = _race({"plain": hf(False), "constrained": hf(True)}, repeats)
    figures["batched_constraint_overhead"] = round(1 - t["plain"]["cpu"] / t["constrained"]["cpu"], 4)
    return figures
