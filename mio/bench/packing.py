"""`mio bench packing`: masked packing against pad-to-longest batches, measured in one run.

The samples are a synthetic MIO stage-II mixture (batch ratio image-text 2 : language 2 :
interleaved + video 6 : speech-text 6, DESIGN.md), with the token layout of real samples:

- image-text pairs: ``<image>`` + 32 codes + ``</image>`` and a 6-86 token caption (40-120 tokens);
- language: web text, log-normal lengths (median 500), text only, so longer ones are cut;
- interleaved documents: text with images every 100-400 tokens, 300-3500 tokens, cut outside images;
- video-text pairs: 4-8 key frames (image blocks) and a 10-60 token description;
- speech-text: ASR with 1-15 s of content codes (50-750) as input, and TTS with all 4 layers
  (200-3000 codes) as output; TTS samples over the context are dropped, as they must be.

Figures:

- ``efficiency``: real tokens / (packs x context) of the best-fit packer;
- ``padded_efficiency``: real tokens / padded tokens of pad-to-longest batches of the same samples
  in arrival order, ``padded_batch_size`` (8, Hugging Face Trainer's default) samples per batch;
  ``padded_efficiency_by_batch_size`` gives the same for other batch sizes;
- ``speedup_vs_padded``: real tokens per second of a tiny Llama forward+backward on packed
  micro-batches (SDPA with the 4D document mask, as many packs as hold about 8 samples) over
  pad-to-longest micro-batches of exactly the same samples (SDPA, padding mask). On CPU both are
  timed as process CPU time on one thread, so other processes on the machine stay out of it;
- ``packer_headroom``: packer samples per second on one core over the samples per second the
  tiny model trains on;
- ``peak_memory_mb``: memory added at the peak of one forward+backward of the fullest pack
  (2800 tokens) per backend: CUDA max allocated, CPU peak RSS. None where the backend cannot run
  it here: torch 2.11's FlexAttention has no backward on CPU, flash-attn needs a GPU.
  ``peak_forward_memory_mb`` is the same for a forward alone, which FlexAttention runs on CPU;
- ``memory[backend]["mask_bytes"]``: bytes of the attention-isolation tensors of that pack
  (SDPA's (L, L) mask against FlexAttention's block tables and flash-attn's ``cu_seqlens``).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import time
from collections.abc import Callable

import numpy as np
import torch

from mio.data.packing import BestFitPacker, Pack, TokenSample, collate_packs
from mio.model.attention import BACKENDS, hf_attn_implementation, packed_attention_kwargs, pad_multiple
from mio.model.forward import supervised_positions
from mio.process_memory import peak_rss_mb, reset_peak_rss, rss_mb
from mio.train.loss import micro_batch_loss, step_tokens, supervised_count, supervised_targets, token_cross_entropy
from mio.vocab import IGNORE_INDEX, IMAGE_CODE, SPEECH_CODE, TEXT_CODE

VOCAB = 4096
IMAGE_BEGIN, IMAGE_END, SPEECH_BEGIN, SPEECH_END = 4, 5, 6, 7
TEXT_IDS = (16, 2048)
IMAGE_CODES = (2048, 3072)
SPEECH_CODES = (3072, 4096)

# Stage II batch ratio: image-text 2, language 2, interleaved + video 6, speech-text 6.
MIXTURE = {"image_text": 2, "language": 2, "interleaved": 4, "video_text": 2, "asr": 3, "tts": 3}


class _Builder:
    """Concatenates segments of one sample: ids, labels and modality side by side."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.ids: list[np.ndarray] = []
        self.sup: list[np.ndarray] = []
        self.mod: list[np.ndarray] = []

    def text(self, n: int, supervised: bool) -> None:
        self._add(self.rng.integers(*TEXT_IDS, n), supervised, TEXT_CODE)

    def image(self, supervised: bool) -> None:
        codes = self.rng.integers(*IMAGE_CODES, 32)
        self._add(np.concatenate([[IMAGE_BEGIN], codes, [IMAGE_END]]), supervised, IMAGE_CODE)

    def speech(self, n: int, supervised: bool) -> None:
        codes = self.rng.integers(*SPEECH_CODES, n)
        self._add(np.concatenate([[SPEECH_BEGIN], codes, [SPEECH_END]]), supervised, SPEECH_CODE)

    def _add(self, ids: np.ndarray, supervised: bool, modality: int) -> None:
        self.ids.append(ids.astype(np.int64))
        self.sup.append(np.full(len(ids), supervised))
        self.mod.append(np.full(len(ids), modality, np.int8))

    def sample(self, text_only: bool) -> TokenSample:
        ids = np.concatenate(self.ids)
        labels = np.where(np.concatenate(self.sup), ids, IGNORE_INDEX)
        return TokenSample(ids, labels, text_only=text_only, modality=np.concatenate(self.mod))


def _mixture_sample(kind: str, rng: np.random.Generator) -> TokenSample:
    b = _Builder(rng)
    if kind == "image_text":
        caption = int(rng.integers(6, 87))
        if rng.random() < 0.5:
            b.image(False), b.text(caption, True)
        else:
            b.text(caption, False), b.image(True)
        return b.sample(text_only=False)
    if kind == "language":
        b.text(int(np.clip(rng.lognormal(np.log(500), 1.1), 8, 20000)), True)
        return b.sample(text_only=True)
    if kind == "interleaved":
        target = int(rng.integers(300, 3501))
        while sum(map(len, b.ids)) < target:
            b.text(int(rng.integers(100, 401)), True)
            b.image(True)
        return b.sample(text_only=True)
    if kind == "video_text":
        frames, words = int(rng.integers(4, 9)), int(rng.integers(10, 61))
        if rng.random() < 0.6:
            b.text(words, False)
            for _ in range(frames):
                b.image(True)
        else:
            for _ in range(frames):
                b.image(False)
            b.text(words, True)
        return b.sample(text_only=False)
    frames = int(rng.integers(50, 751))  # 1-15 s at 50 Hz
    words = max(3, frames // 12)
    if kind == "asr":
        b.speech(frames, False), b.text(8, False), b.text(words, True)
    else:
        b.text(8 + words, False), b.speech(4 * frames, True)
    return b.sample(text_only=False)


def mixture(n: int, seed: int = 0) -> list[TokenSample]:
    """``n`` samples of the synthetic stage-II mixture."""
    rng = np.random.default_rng(seed)
    kinds = list(MIXTURE)
    weights = np.array([MIXTURE[k] for k in kinds], dtype=np.float64)
    draws = rng.choice(len(kinds), size=n, p=weights / weights.sum())
    return [_mixture_sample(kinds[i], rng) for i in draws]


def tiny_llama(attn_implementation: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The benchmark's tiny Llama (random weights, built from a config: nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).train()


def padded_batch(sequences: list[TokenSample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The usual baseline: one sample per row, right-padded to the longest, with a padding mask."""
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.from_numpy(s.input_ids)
        labels[row, :n] = torch.from_numpy(s.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def padded_efficiency(sequences: list[TokenSample], batch_size: int) -> float:
    """Real tokens over padded tokens of pad-to-longest batches of ``batch_size`` in arrival order."""
    lengths = np.array([len(s.input_ids) for s in sequences])
    padded = sum(len(chunk) * chunk.max() for chunk in np.array_split(lengths, -(-len(lengths) // batch_size)))
    return float(lengths.sum() / padded)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _backward(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The training loss (mio/train/loss.py) of (N, V) logits at the supervised positions, backward."""
    token_loss = token_cross_entropy(logits, supervised_targets(labels))
    micro_batch_loss(token_loss, step_tokens(supervised_count(labels))).backward()


def _train_step_packed(model: torch.nn.Module, batch: dict, backend: str) -> None:
    logits = model(input_ids=batch["input_ids"], **packed_attention_kwargs(backend, batch)).logits
    _backward(logits[supervised_positions(batch["labels"])], batch["labels"])


def _train_step_padded(model: torch.nn.Module, batch: dict) -> None:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _backward(logits[supervised_positions(batch["labels"])], batch["labels"])


def _seconds(work: Callable[[], object], device: torch.device) -> float:
    """CUDA: wall-clock seconds. CPU: seconds of this process's CPU time, run on one thread, so
    that other processes sharing the machine do not enter the figure."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        work()
        return time.process_time() - start
    finally:
        torch.set_num_threads(threads)


def training_throughput(sequences: list[TokenSample], context_length: int, buffer_size: int, padded_batch_size: int,
                        device: torch.device, dtype: torch.dtype) -> dict:
    """Forward+backward time of the same sequences, packed (SDPA + 4D mask) and pad-to-longest.

    Padded micro-batches hold ``padded_batch_size`` samples in arrival order; packed micro-batches
    hold as many packs as make about the same number of samples, so both take about the same
    number of optimizer steps over the same tokens.
    """
    packs = list(BestFitPacker(context_length, buffer_size=buffer_size)(sequences))
    rows = max(1, round(padded_batch_size * len(packs) / len(sequences)))
    packed = [_to(collate_packs(packs[i : i + rows]), device) for i in range(0, len(packs), rows)]
    padded = [_to(padded_batch(sequences[i : i + padded_batch_size]), device)
              for i in range(0, len(sequences), padded_batch_size)]
    model = tiny_llama("sdpa", device, dtype)
    _train_step_packed(model, packed[0], "sdpa"), _train_step_padded(model, padded[-1])  # warm-up
    packed_s = _seconds(lambda: [_train_step_packed(model, b, "sdpa") for b in packed], device)
    padded_s = _seconds(lambda: [_train_step_padded(model, b) for b in padded], device)
    tokens = sum(len(s.input_ids) for s in sequences)
    return {
        "timed_samples": len(sequences),
        "timed_tokens": tokens,
        "packed_micro_batches": len(packed),
        "packed_rows_per_micro_batch": rows,
        "padded_micro_batches": len(padded),
        "packed_tokens_per_s": tokens / packed_s,
        "padded_tokens_per_s": tokens / padded_s,
        "model_samples_per_s": len(sequences) / packed_s,
        "speedup_vs_padded": padded_s / packed_s,
    }


def _trim_and_reset_peak() -> float | None:
    """CPU: give freed heap back to the OS and restart the peak-RSS counter; the RSS in MB, or
    None where the peak cannot be restarted."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return None
    return rss_mb() if reset_peak_rss() else None


def _peak_mb(work: Callable[[], object], device: torch.device) -> float | None:
    """Memory added at the peak of ``work``: CUDA max allocated, CPU peak RSS (None if unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _trim_and_reset_peak()
    if base is None:
        return None
    work()
    return peak_rss_mb() - base


def _kwargs_bytes(kwargs: dict) -> int:
    """Bytes of the attention-isolation tensors (position ids excluded: every backend needs them)."""
    total = 0
    for name, value in kwargs.items():
        if name == "position_ids":
            continue
        parts = value.as_tuple() if hasattr(value, "as_tuple") else (value,)
        total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total


def backend_memory(backend: str, pack: Pack, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory of a forward, and of a forward+backward where the backend has one, on one pack."""
    if backend == "flash" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        return {"unavailable": "flash-attn needs a CUDA device and the flash-attn package"}
    multiple = pad_multiple(backend)
    batch = _to(collate_packs([_padded_to(pack, -(-len(pack.input_ids) // multiple) * multiple)]), device)
    model = tiny_llama(hf_attn_implementation(backend), device, dtype)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], **packed_attention_kwargs(backend, batch))

    forward()  # warm-up: compiles flex kernels, whose memory is not the step's
    with torch.no_grad():
        mask_bytes = _kwargs_bytes(packed_attention_kwargs(backend, batch))
    out = {"length": int(batch["input_ids"].shape[1]), "mask_bytes": mask_bytes, "forward_mb": _peak_mb(forward, device)}
    if backend == "flex" and device.type == "cpu":
        return {**out, "forward_backward_mb": None, "why": "torch 2.11 FlexAttention has no backward on CPU"}
    _train_step_packed(model, batch, backend)  # warm-up of the backward
    model.zero_grad(set_to_none=True)
    return {**out, "forward_backward_mb": _peak_mb(lambda: _train_step_packed(model, batch, backend), device)}


def _padded_to(pack: Pack, length: int) -> Pack:
    pad = length - len(pack.input_ids)
    return Pack(
        input_ids=np.concatenate([pack.input_ids, np.zeros(pad, np.int64)]),
        labels=np.concatenate([pack.labels, np.full(pad, IGNORE_INDEX, np.int64)]),
        position_ids=np.concatenate([pack.position_ids, np.zeros(pad, np.int64)]),
        document_ids=np.concatenate([pack.document_ids, np.full(pad, -1, np.int32)]),
        modality=np.concatenate([pack.modality, np.full(pad, -1, np.int8)]),
        seq_lens=pack.seq_lens,
    )


def bench_packing(samples: int = 8000, context_length: int = 2800, buffer_size: int = 64, timed_samples: int = 40,
                  padded_batch_size: int = 8, seed: int = 0, device: str = "auto") -> dict:
    """Packing efficiency, speed against pad-to-longest, packer headroom and memory per backend.

    ``padded_batch_size`` 8 is Hugging Face Trainer's default per-device batch size.
    """
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    data = mixture(samples, seed)

    packer = BestFitPacker(context_length, buffer_size=buffer_size, seed=seed)
    start = time.process_time()  # CPU time: per core, and blind to other processes on the machine
    packs = list(packer(data))
    packer_rate = samples / (time.process_time() - start)
    sequences = list(BestFitPacker(context_length).sequences(data))

    speed = training_throughput(sequences[:timed_samples], context_length, buffer_size, padded_batch_size, dev, dtype)
    fullest = max(packs, key=lambda p: sum(p.seq_lens))
    memory = {backend: backend_memory(backend, fullest, dev, dtype) for backend in BACKENDS}
    return {
        "efficiency": packer.stats.efficiency,
        "padded_efficiency": padded_efficiency(sequences, padded_batch_size),
        "speedup_vs_padded": speed["speedup_vs_padded"],
        "packer_headroom": packer_rate / speed["model_samples_per_s"],
        "packer_samples_per_s_per_core": packer_rate,
        **{k: v for k, v in speed.items() if k != "speedup_vs_padded"},
        "peak_memory_mb": {b: m.get("forward_backward_mb") for b, m in memory.items()},
        "peak_forward_memory_mb": {b: m.get("forward_mb") for b, m in memory.items()},
        "memory": memory,
        "padded_efficiency_by_batch_size": {b: padded_efficiency(sequences, b) for b in (1, 2, 4, 8, 16, 32)},
        "padded_batch_size": padded_batch_size,
        "packing_stats": dict(vars(packer.stats)),
        "context_length": context_length,
        "buffer_size": buffer_size,
        "samples": samples,
        "mixture": MIXTURE,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": "cuda wall-clock" if dev.type == "cuda" else "process CPU time, one thread",
        "targets": {"efficiency": 0.99, "speedup_vs_padded": 2.0, "packer_headroom": 100.0},
    }
