"""The decoding loop: modality-constrained, with the settings of each modality switched at
every block boundary, over any Hugging Face causal LM and its KV cache.

Outside media the text settings choose tokens; with ``num_beams > 1`` that is a beam-search
phase that ends when its best hypothesis ends, with a stop token or with a media start token
(which then opens a block decoded with that modality's settings). Inside a block, tokens are
sampled (or picked greedily) one by one. Each step follows transformers' own order and
arithmetic (repetition penalty, constraint, temperature, top-k, top-p; beam search on
log-probabilities with its length penalty and stopping rule), so with one setting for every
modality the loop reproduces ``model.generate`` with :class:`ModalityConstraint` token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from mio.generate.constraints import TEXT, BlockState, ModalityConstraint
from mio.generate.settings import DecodeSettings

STOP, LENGTH = "stop", "length"


@dataclass
class DecodeResult:
    ids: list[int]  # the new tokens, stop token included when there is one
    modes: list[str]  # per new token: the settings that chose it (text, image, video, speech)
    stopped: str  # STOP (a stop token) or LENGTH (max_new_tokens reached)
    seconds: float = 0.0
    forward_passes: int = 0
    beam_phases: int = 0

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Stream:
    """One sequence being decoded: ids on the host (for the state machine) and on the device."""

    host: np.ndarray  # (capacity,) int64; the first `length` are the sequence
    device_ids: torch.Tensor  # (1, capacity) the same ids on the model's device
    length: int
    logits: torch.Tensor  # (1, V) float32 scores of the next token
    cache: Any  # the model's KV cache, None without one
    result: DecodeResult = field(default_factory=lambda: DecodeResult([], [], LENGTH))

    def ids(self) -> torch.Tensor:
        return self.device_ids[:, :self.length]

    def append(self, tokens: Sequence[int]) -> None:
        n = len(tokens)
        self.host[self.length:self.length + n] = tokens
        self.device_ids[0, self.length:self.length + n] = torch.as_tensor(tokens, device=self.device_ids.device)
        self.length += n


class Decoder:
    """Runs the loop for one model, one constraint and one set of per-modality settings."""

    def __init__(self, model: Any, constraint: ModalityConstraint, settings: dict[str, DecodeSettings],
                 stop_ids: Sequence[int], use_cache: bool = True) -> None:
        self.model = model
        self.constraint = constraint
        self.settings = settings
        self.stop_ids = sorted({int(i) for i in stop_ids})
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        table = constraint.table
        begins = ([table.image_begin] if constraint.allow_image else []) + ([table.speech_begin] if constraint.allow_speech else [])
        # A text beam phase ends on a stop token or on a media start token.
        self.phase_enders = torch.tensor(self.stop_ids + begins, device=self.device)
        self._penalties = {m: s.penalties() for m, s in settings.items()}
        self._warpers = {m: s.warpers() for m, s in settings.items()}

    # --- model calls -------------------------------------------------------------------------
    def _forward(self, new: torch.Tensor, full: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Scores of the next token after ``full`` (B, L), whose last ``new`` (B, k) ids are not yet cached."""
        if self.use_cache:
            out = self.model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float(), out.past_key_values
        out = self.model(input_ids=full, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float(), None

    # --- the loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, seed: int = 0) -> DecodeResult:
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"the prompt must be a non-empty 1-D sequence of ids, got shape {prompt.shape}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        start = time.perf_counter()
        capacity = prompt.size + max_new_tokens
        host = np.zeros(capacity, dtype=np.int64)
        host[:prompt.size] = prompt
        device_ids = torch.from_numpy(host).to(self.device)[None]
        first = device_ids[:, :prompt.size]
        logits, cache = self._forward(first, first, None)
        s = _Stream(host, device_ids, prompt.size, logits, cache)
        s.result.forward_passes = 1
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        while len(s.result.ids) < max_new_tokens and s.result.stopped != STOP:
            state = self.constraint.state(s.host[:s.length])
            if state.mode == TEXT and self.settings[TEXT].num_beams > 1:
                self._beam_phase(s, max_new_tokens - len(s.result.ids))
            else:
                self._single_step(s, state, max_new_tokens, generator)
        s.result.seconds = time.perf_counter() - start
        return s.result

    def _single_step(self, s: _Stream, state: BlockState, max_new_tokens: int, generator: torch.Generator) -> None:
        mode = state.mode
        cfg = self.settings[mode]
        ids = s.ids()
        scores = self._penalties[mode](ids, s.logits)
        scores = scores + self.constraint.bias([self.constraint.allowed_key(state)], scores.shape[-1], scores.device,
                                               scores.dtype)
        if cfg.do_sample:
            probs = torch.softmax(self._warpers[mode](ids, scores), dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        s.append([token])
        s.result.ids.append(token)
        s.result.modes.append(mode)
        if mode == TEXT and token in self.stop_ids:
            s.result.stopped = STOP
            return
        if len(s.result.ids) < max_new_tokens:
            s.logits, s.cache = self._forward(s.ids()[:, -1:], s.ids(), s.cache)
            s.result.forward_passes += 1

    def _beam_phase(self, s: _Stream, budget: int) -> None:
        """Beam search over text until its best hypothesis ends; the stream then continues with it.

        Mirrors transformers' ``_beam_search`` for one sequence: log-softmax, processors, the
        top ``K`` continuations of all beams, hypotheses kept only from the top ``num_beams``,
        length-normalised scores, and its early-stopping rule.
        """
        cfg = self.settings[TEXT]
        B, L0, V = cfg.num_beams, s.length, s.logits.shape[-1]
        K = max(2, 1 + len(self.phase_enders)) * B
        seqs = np.repeat(s.host[None, :L0 + budget], B, axis=0)  # (B, L0 + budget) host copies of the beams
        dev = s.device_ids[:, :L0 + budget].repeat(B, 1)  # (B, L0 + budget)
        running = torch.full((B,), -1e9, device=self.device)
        running[0] = 0.0  # only the first beam's continuations count at the first step
        logits = s.logits.expand(B, V)
        cache = s.cache
        if cache is not None:
            cache.batch_repeat_interleave(B)
        pool: list[tuple[float, list[int]]] = []  # finished hypotheses (score, tokens), best first
        improvable = True
        for step in range(budget):
            cur = L0 + step
            logp = torch.log_softmax(logits, dim=-1)
            logp = self._penalties[TEXT](dev[:, :cur], logp)
            keys = [self.constraint.allowed_key(self.constraint.state(row[:cur])) for row in seqs]
            logp = logp + self.constraint.bias(keys, V, self.device, logp.dtype)
            top_v, top_i = (logp + running[:, None]).view(-1).topk(K)  # (K,)
            beam, token = top_i // V, top_i % V
            ends = torch.isin(token, self.phase_enders) | (step + 1 >= budget)  # (K,)
            if improvable and not (len(pool) >= B and cfg.early_stopping):
                scale = float(step + 1) ** cfg.length_penalty
                for i in torch.nonzero(ends[:B]).flatten().tolist():
                    pool.append((float(top_v[i]) / scale, seqs[int(beam[i]), L0:cur].tolist() + [int(token[i])]))
                pool = sorted(pool, key=lambda h: -h[0])[:B]
            keep = (top_v - ends.float() * 1e9).topk(B).indices  # the best unfinished continuations
            running = top_v[keep] - ends[keep].float() * 1e9
            best_possible = float(running[0]) / float(step + 1) ** cfg.length_penalty
            improvable = improvable and (len(pool) < B or best_possible > min(h[0] for h in pool))
            if not improvable or (len(pool) >= B and cfg.early_stopping) or bool(ends.all()):
                break
            order = beam[keep]
            seqs[:, :cur] = seqs[order.cpu().numpy(), :cur]
            seqs[:, cur] = token[keep].cpu().numpy()
            dev[:, :cur] = dev[order, :cur]
            dev[:, cur] = token[keep]
            if cache is not None:
                cache.reorder_cache(order)
            logits, cache = self._forward(dev[:, cur:cur + 1], dev[:, :cur + 1], cache)
            s.result.forward_passes += 1
        best = pool[0][1]
        s.result.beam_phases += 1
        s.append(best)
        s.result.ids.extend(best)
        s.result.modes.extend([TEXT] * len(best))
        if best[-1] in self.stop_ids:
            s.result.stopped = STOP
            return
        if len(best) >= budget:
            return
        # The phase ended on a media start: continue from the chosen hypothesis alone.
        s.logits, s.cache = self._continue_from(cache, L0, cur, s)

    def _continue_from(self, cache: Any, prefix: int, cached: int, s: _Stream) -> tuple[torch.Tensor, Any]:
        """The beams' cache (``cached`` tokens) cut back to the shared prefix, one row kept, and
        the chosen hypothesis run through the model."""
        new = s.device_ids[:, prefix:s.length]
        if cache is not None:
            cache.crop(prefix - cached)
            cache.batch_select_indices(torch.tensor([0], device=self.device))
        s.result.forward_passes += 1
        return self._forward(new, s.ids(), cache)
