"""The decoding loop: modality-constrained, with the settings of each modality switched at
every block boundary, over any Hugging Face causal LM and its KV cache.

A run is a sequence of phases. Each phase uses the settings of the mode the sequence is in
(text outside media, image, video or speech inside a block). With ``num_beams > 1`` a phase
is a beam search that lasts while its hypotheses stay in modes with the same settings: a
hypothesis ends with a stop token or with the token that takes it into a mode with other
settings (a media start under Table 8, whose media are sampled), and the best hypothesis
carries the sequence on. Without beams, tokens are sampled (or picked greedily) one by one,
each with its own mode's settings. So beam search works inside media blocks too, under the
constraint, and with one setting for every modality a whole answer is one phase.

Each step follows transformers' own order and arithmetic (repetition penalty, constraint,
temperature, top-k, top-p; beam search on log-probabilities with its length penalty and
stopping rule), so with one setting for every modality the loop reproduces
``model.generate`` with :class:`ModalityConstraint` token for token.

Memory follows the tokens made, never the requested limit: id buffers grow by doubling, and
the limit itself is capped at what the model's positions allow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from mio.generate.constraints import BlockState, ModalityConstraint
from mio.generate.settings import DecodeSettings
from mio.vocab import TEXT

STOP, LENGTH = "stop", "length"


@dataclass
class DecodeResult:
    ids: list[int]  # the new tokens, stop token included when there is one
    modes: list[str]  # per new token: the mode whose settings chose it (text, image, video, speech)
    stopped: str  # STOP (a stop token) or LENGTH (the token limit reached)
    seconds: float = 0.0
    forward_passes: int = 0
    beam_phases: int = 0
    notes: list[str] = field(default_factory=list)  # what the loop changed of the request (a capped limit)

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


def position_limit(model: Any) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings``, which
    transformers' configs map from their own names such as GPT-2's ``n_positions``), or None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def bound_new_tokens(model: Any, prompt_len: int, requested: int) -> tuple[int, str | None]:
    """``requested`` capped so that prompt and answer fit the model's positions -> (limit, note).

    A prompt that already fills them is an error: the model could not read one more token.
    """
    if requested < 1:
        raise ValueError(f"max_new_tokens must be positive, got {requested}")
    limit = position_limit(model)
    if limit is None or prompt_len + requested <= limit:
        return requested, None
    room = limit - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens and the model's positions allow {limit} "
                         "(max_position_embeddings): shorten the prompt")
    return room, (f"max_new_tokens {requested} capped at {room}: the prompt has {prompt_len} tokens and the "
                  f"model's positions allow {limit} (max_position_embeddings)")


class TokenBuffer:
    """(R, length) token ids, on the host (for the state machine) and on the model's device.

    Room grows by doubling, so memory follows the tokens made, never a requested limit.
    """

    def __init__(self, rows: np.ndarray, device: torch.device) -> None:
        rows = np.asarray(rows, dtype=np.int64)  # (R, L)
        self.length = rows.shape[1]
        self.host = np.zeros((rows.shape[0], max(64, 2 * self.length)), dtype=np.int64)
        self.host[:, :self.length] = rows
        self.dev = torch.tensor(self.host, device=device)  # a copy: reordering one must not reorder the other

    def _reserve(self, n: int) -> None:
        if self.length + n <= self.host.shape[1]:
            return
        capacity = max(2 * self.host.shape[1], self.length + n)
        host = np.zeros((self.host.shape[0], capacity), dtype=np.int64)
        host[:, :self.length] = self.host[:, :self.length]
        dev = torch.zeros(host.shape, dtype=torch.long, device=self.dev.device)
        dev[:, :self.length] = self.dev[:, :self.length]
        self.host, self.dev = host, dev

    def ids(self) -> torch.Tensor:
        """(R, length) on the device."""
        return self.dev[:, :self.length]

    def rows(self) -> np.ndarray:
        """(R, length) on the host."""
        return self.host[:, :self.length]

    def append(self, tokens: np.ndarray, on_device: torch.Tensor | None = None) -> None:
        """(R, k) tokens after every row; ``on_device``: the same tokens already on the device."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.host.shape[0], -1)
        n = tokens.shape[1]
        self._reserve(n)
        self.host[:, self.length:self.length + n] = tokens
        self.dev[:, self.length:self.length + n] = (on_device.view(-1, n) if on_device is not None
                                                   else torch.from_numpy(tokens).to(self.dev.device))
        self.length += n

    def reorder(self, order: torch.Tensor) -> None:
        """Rows become rows ``order`` (beam search keeping its best continuations)."""
        self.host[:, :self.length] = self.host[order.cpu().numpy(), :self.length]
        self.dev[:, :self.length] = self.dev[order, :self.length]


@dataclass
class _Stream:
    """The sequence being decoded, the scores of its next token and the model's cache."""

    buf: TokenBuffer  # (1, length)
    logits: torch.Tensor  # (1, V) float32 scores of the next token
    cache: Any  # the model's KV cache, None without one
    result: DecodeResult = field(default_factory=lambda: DecodeResult([], [], LENGTH))

    def append(self, tokens: Sequence[int], modes: Sequence[str]) -> None:
        self.buf.append(np.asarray(tokens, dtype=np.int64)[None])
        self.result.ids.extend(int(t) for t in tokens)
        self.result.modes.extend(modes)


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
        """Decode after ``prompt_ids``; ``max_new_tokens`` is capped at what the model's positions
        allow (the cap is reported in the result's ``notes``)."""
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"the prompt must be a non-empty 1-D sequence of ids, got shape {prompt.shape}")
        max_new_tokens, note = bound_new_tokens(self.model, prompt.size, max_new_tokens)
        start = time.perf_counter()
        buf = TokenBuffer(prompt[None], self.device)
        logits, cache = self._forward(buf.ids(), buf.ids(), None)
        s = _Stream(buf, logits, cache)
        s.result.forward_passes = 1
        if note:
            s.result.notes.append(note)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        while len(s.result.ids) < max_new_tokens and s.result.stopped != STOP:
            state = self.constraint.state(s.buf.rows()[0])
            if self.settings[state.mode].num_beams > 1:
                self._beam_phase(s, state, max_new_tokens - len(s.result.ids))
            else:
                self._single_step(s, state, max_new_tokens, generator)
        s.result.seconds = time.perf_counter() - start
        return s.result

    def _single_step(self, s: _Stream, state: BlockState, max_new_tokens: int, generator: torch.Generator) -> None:
        mode = state.mode
        cfg = self.settings[mode]
        ids = s.buf.ids()
        scores = self._penalties[mode](ids, s.logits)
        scores = scores + self.constraint.bias([self.constraint.allowed_key(state)], scores.shape[-1], scores.device,
                                               scores.dtype)
        if cfg.do_sample:
            probs = torch.softmax(self._warpers[mode](ids, scores), dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        s.append([token], [mode])
        if mode == TEXT and token in self.stop_ids:
            s.result.stopped = STOP
            return
        if len(s.result.ids) < max_new_tokens:
            s.logits, s.cache = self._forward(s.buf.ids()[:, -1:], s.buf.ids(), s.cache)
            s.result.forward_passes += 1

    def _phase_modes(self, cfg: DecodeSettings) -> set[str]:
        """The modes a beam phase with settings ``cfg`` may run through."""
        return {m for m, other in self.settings.items() if other == cfg}

    def _ends(self, states: list[BlockState], last: np.ndarray, beam: np.ndarray, token: np.ndarray,
              inside: set[str]) -> np.ndarray:
        """(K,) bool: candidate (beam, token) ends its hypothesis: a stop token, or a token after
        which the row is in a mode outside the phase's."""
        stops = set(self.stop_ids)
        return np.array([int(t) in stops or
                         self.constraint.mode_after(states[b].mode, int(last[b]), int(t)) not in inside
                         for b, t in zip(beam, token)], dtype=bool)

    def _beam_phase(self, s: _Stream, state: BlockState, budget: int) -> None:
        """Beam search until its best hypothesis ends; the stream then continues with it.

        Mirrors transformers' ``_beam_search`` for one sequence: log-softmax, processors, the
        top ``K`` continuations of all beams, hypotheses kept only from the top ``num_beams``,
        length-normalised scores, and its early-stopping rule.
        """
        mode = state.mode
        cfg = self.settings[mode]
        inside = self._phase_modes(cfg)
        B, L0, V = cfg.num_beams, s.buf.length, s.logits.shape[-1]
        # Tokens that can end a hypothesis besides the stop tokens: block markers into or out
        # of modes with other settings (none when every mode has these settings, as in HF).
        enders = 0 if inside == set(self.settings) else 2
        K = max(2, 1 + len(self.stop_ids) + enders) * B
        beams = TokenBuffer(np.repeat(s.buf.rows(), B, axis=0), self.device)  # (B, L0 + step)
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
            logp = self._penalties[mode](beams.ids(), logp)
            rows = beams.rows()
            states = self.constraint.states(rows)
            logp = logp + self.constraint.bias([self.constraint.allowed_key(x) for x in states], V, self.device,
                                               logp.dtype)
            top_v, top_i = (logp + running[:, None]).view(-1).topk(K)  # (K,)
            beam, token = top_i // V, top_i % V
            ends = self._ends(states, rows[:, -1], beam.cpu().numpy(), token.cpu().numpy(), inside)
            ends = torch.from_numpy(ends | (step + 1 >= budget)).to(self.device)  # (K,)
            if improvable and not (len(pool) >= B and cfg.early_stopping):
                scale = float(step + 1) ** cfg.length_penalty
                for i in torch.nonzero(ends[:B]).flatten().tolist():
                    pool.append((float(top_v[i]) / scale, rows[int(beam[i]), L0:].tolist() + [int(token[i])]))
                pool = sorted(pool, key=lambda h: -h[0])[:B]
            keep = (top_v - ends.float() * 1e9).topk(B).indices  # the best unfinished continuations
            running = top_v[keep] - ends[keep].float() * 1e9
            best_possible = float(running[0]) / float(step + 1) ** cfg.length_penalty
            improvable = improvable and (len(pool) < B or best_possible > min(h[0] for h in pool))
            if not improvable or (len(pool) >= B and cfg.early_stopping) or bool(ends.all()):
                break
            order = beam[keep]
            beams.reorder(order)
            beams.append(token[keep].cpu().numpy()[:, None], token[keep])
            if cache is not None:
                cache.reorder_cache(order)
            logits, cache = self._forward(beams.ids()[:, -1:], beams.ids(), cache)
            s.result.forward_passes += 1
        best = pool[0][1]
        s.result.beam_phases += 1
        s.append(best, self._modes_of(mode, int(s.buf.rows()[0, -1]), best))
        if best[-1] in self.stop_ids:
            s.result.stopped = STOP
            return
        if len(best) >= budget:
            return
        # The phase ended on a change of mode: continue from the chosen hypothesis alone.
        s.logits, s.cache = self._continue_from(cache, L0, beams.length, s)

    def _modes_of(self, mode: str, last: int, tokens: list[int]) -> list[str]:
        """The mode each of ``tokens`` was chosen in, the first in ``mode`` after ``last``."""
        modes = []
        for t in tokens:
            modes.append(mode)
            mode, last = self.constraint.mode_after(mode, last, t), t
        return modes

    def _continue_from(self, cache: Any, prefix: int, cached: int, s: _Stream) -> tuple[torch.Tensor, Any]:
        """The beams' cache (``cached`` tokens) cut back to the shared prefix, one row kept, and
        the chosen hypothesis run through the model."""
        new = s.buf.ids()[:, prefix:]
        if cache is not None:
            cache.crop(prefix - cached)
            cache.batch_select_indices(torch.tensor([0], device=self.device))
        s.result.forward_passes += 1
        return self._forward(new, s.buf.ids(), cache)
