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

The loop decodes a batch of sequences at once (one sequence is a batch of one): each keeps its
own constraint state, per-modality settings, token limit and random generator (seeded per
sequence, so its tokens do not depend on its batch). The model sees one row per sequence, or
``num_beams`` rows while it is in a beam phase, left-padded, with one attention mask and one
KV cache; a finished sequence's rows leave the batch, so it stops costing compute. Rows whose
next input is longer than one token (prompts; a beam phase's chosen hypothesis) are padded on
the left within the step's input; tokens a row no longer stands on (padding, abandoned beams)
stay in the cache masked out, and hold the row's first token, which the repetition penalty
already counts.

The loop runs step by step (:meth:`Decoder.step`), and sequences may join between steps
(:meth:`Decoder.start`): a newcomer's prompt is its row's input of the next step, beside the
other rows' one token (the step is as long as the prompt), its row's earlier columns masked
out. So `mio serve` decodes requests as they come in the same loop as a batch of prompts
(:meth:`Decoder.run_batch`: all start, then steps until every one is done). Each sequence may
carry its own constraint and stop tokens (requests asking for different outputs), and a
cancelled one leaves the batch at the next step.

Classifier-free guidance: while a sequence whose settings guide a media modality (``guidance``
!= 1) is inside a block of that modality, it stands on one more row, its *unconditional* row, last
among its rows: the unconditional prompt (the conversation without its condition, or with a
negative prompt) followed by every token the sequence has made, with its own KV cache row. There
the next token's logits are ``uncond + s * (cond - uncond)`` of the two rows, before the
penalties, the constraint and the warpers; everywhere else the conditional row's logits are used
as they are, so text outside media is decoded exactly as without guidance, and at the same cost:
the unconditional row joins the batch with the token that opens a guided block (its whole input
in that one step, as a newcomer's prompt) and leaves with the token that closes it. Guided modes
never run a beam phase (the settings refuse it), so a beam phase never has an unconditional row.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from mio.generate.constraints import BlockState, ModalityConstraint
from mio.generate.settings import DecodeSettings
from mio.userio import MioUserError
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
    # With Decoder(keep_logits=True): per new token, the (V,) float32 logits it was chosen from
    # (guided where guided; before penalties, constraint and warpers); None in a beam phase.
    logits: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


def position_limit(model: Any) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings``, which
    transformers' configs map from their own names such as GPT-2's ``n_positions``), or None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


class PromptTooLong(MioUserError):
    """A prompt that fills the model's positions already (a server answers it as OpenAI's
    ``context_length_exceeded``)."""


def bound_new_tokens(model: Any, prompt_len: int, requested: int) -> tuple[int, str | None]:
    """``requested`` capped so that prompt and answer fit the model's positions -> (limit, note).

    A prompt that already fills them is an error: the model could not read one more token.
    """
    if requested < 1:
        raise MioUserError(f"max_new_tokens must be positive, got {requested}")
    limit = position_limit(model)
    if limit is None or prompt_len + requested <= limit:
        return requested, None
    room = limit - prompt_len
    if room < 1:
        raise PromptTooLong(f"the prompt has {prompt_len} tokens and the model's positions allow {limit} "
                            "(max_position_embeddings): shorten the prompt")
    return room, (f"max_new_tokens {requested} capped at {room}: the prompt has {prompt_len} tokens and the "
                  f"model's positions allow {limit} (max_position_embeddings)")


class TokenBuffer:
    """(R, length) token ids on the host (for the state machine); room grows by doubling, so
    memory follows the tokens made, never a requested limit."""

    def __init__(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)  # (R, L)
        self.length = rows.shape[1]
        self.host = np.zeros((rows.shape[0], max(64, 2 * self.length)), dtype=np.int64)
        self.host[:, :self.length] = rows

    def rows(self) -> np.ndarray:
        """(R, length)."""
        return self.host[:, :self.length]

    def append(self, tokens: np.ndarray) -> None:
        """(R, k) tokens after every row."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.host.shape[0], -1)
        n = tokens.shape[1]
        if self.length + n > self.host.shape[1]:
            host = np.zeros((self.host.shape[0], max(2 * self.host.shape[1], self.length + n)), dtype=np.int64)
            host[:, :self.length] = self.host[:, :self.length]
            self.host = host
        self.host[:, self.length:self.length + n] = tokens
        self.length += n

    def reorder(self, order: np.ndarray) -> None:
        """Rows become rows ``order`` (beam search keeping its best continuations)."""
        self.host[:, :self.length] = self.host[order, :self.length]


class _Rows:
    """The model's side of the batch: (R, T) columns of ids and attention mask on the device,
    each row's next position and first token, and the KV cache. Column t is the same step for
    every row; a row's real tokens are its columns with mask 1."""

    def __init__(self, model: Any, device: torch.device, use_cache: bool) -> None:
        self.model, self.device, self.use_cache = model, device, use_cache
        # transformers' generate passes positions only to models whose forward takes them.
        self.positions = "position_ids" in inspect.signature(model.forward).parameters
        self.ids = torch.zeros((0, 64), dtype=torch.long, device=device)  # (R, capacity)
        self.mask = torch.zeros((0, 64), dtype=torch.long, device=device)  # (R, capacity)
        self.length = 0  # T: columns in use
        self.pos = torch.zeros(0, dtype=torch.long, device=device)  # (R,) real tokens so far
        self.filler = torch.zeros(0, dtype=torch.long, device=device)  # (R,) first token of each row
        self.cache: Any = None

    def token_ids(self) -> torch.Tensor:
        """(R, T) ids; masked columns hold the row's first token."""
        return self.ids[:, :self.length]

    def select(self, index: Sequence[int | None], first: Sequence[int] = ()) -> None:
        """Rows become rows ``index`` (kept, reordered, repeated or dropped), cache included; a
        None is a new row, whose first token is the next of ``first``: its columns so far are
        masked out, and its cache entries are copies of row 0's, masked out too."""
        if self.ids.shape[0] == 0:
            return  # no rows yet: the next feed starts the batch
        if list(index) == list(range(self.ids.shape[0])):
            return
        idx = torch.tensor([0 if i is None else i for i in index], dtype=torch.long, device=self.device)
        self.ids, self.mask, self.pos, self.filler = self.ids[idx], self.mask[idx], self.pos[idx], self.filler[idx]
        fresh = [r for r, i in enumerate(index) if i is None]
        if fresh:
            firsts = torch.tensor(list(first), dtype=torch.long, device=self.device)
            self.ids[fresh] = firsts[:, None].expand(len(fresh), self.ids.shape[1])
            self.mask[fresh] = 0
            self.pos[fresh] = 0
            self.filler[fresh] = firsts
        if self.cache is not None:
            self.cache.reorder_cache(idx)

    def forget(self, row: int, column: int) -> None:
        """Row ``row`` no longer stands on its columns from ``column`` on (an abandoned beam phase)."""
        self.mask[row, column:self.length] = 0
        self.ids[row, column:self.length] = self.filler[row]
        self.pos[row] = self.mask[row, :self.length].sum()

    def _reserve(self, n: int) -> None:
        if self.length + n <= self.ids.shape[1]:
            return
        capacity = max(2 * self.ids.shape[1], self.length + n)
        for name in ("ids", "mask"):
            old = getattr(self, name)
            new = torch.zeros((old.shape[0], capacity), dtype=torch.long, device=self.device)
            new[:, :self.length] = old[:, :self.length]
            setattr(self, name, new)

    def feed(self, new: list[list[int]]) -> torch.Tensor:
        """Append each row's new tokens (left-padded to the longest) and run the model: (R, V)
        float32 scores of every row's next token."""
        rows, k = len(new), max(len(t) for t in new)
        if self.ids.shape[0] == 0:  # the first call: the prompts
            self.ids = torch.zeros((rows, max(64, 2 * k)), dtype=torch.long, device=self.device)
            self.mask = torch.zeros_like(self.ids)
            self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.filler = torch.tensor([t[0] for t in new], dtype=torch.long, device=self.device)
        if k == 1:
            chunk = torch.tensor(new, dtype=torch.long, device=self.device)  # (R, 1)
            chunk_mask = torch.ones_like(chunk)
            chunk_pos = self.pos[:, None].clone()
        else:
            chunk = self.filler[:, None].repeat(1, k)  # (R, k)
            chunk_mask = torch.zeros_like(chunk)
            chunk_pos = torch.zeros_like(chunk)
            for i, tokens in enumerate(new):
                n = len(tokens)
                chunk[i, k - n:] = torch.tensor(tokens, dtype=torch.long, device=self.device)
                chunk_mask[i, k - n:] = 1
                chunk_pos[i, k - n:] = self.pos[i] + torch.arange(n, device=self.device)
        self.pos += chunk_mask.sum(1)
        self._reserve(k)
        self.ids[:, self.length:self.length + k] = chunk
        self.mask[:, self.length:self.length + k] = chunk_mask
        self.length += k
        mask = self.mask[:, :self.length]
        if self.use_cache:
            kwargs = {"position_ids": chunk_pos} if self.positions else {}
            # `cache`: transformers 5.24's name (`past_key_values` is deprecated, gone in 5.40).
            out = self.model(input_ids=chunk, attention_mask=mask, cache=self.cache, use_cache=True,
                             logits_to_keep=1, **kwargs)
            self.cache = out.cache
        else:
            kwargs = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if self.positions else {}
            out = self.model(input_ids=self.token_ids(), attention_mask=mask, use_cache=False, logits_to_keep=1,
                             **kwargs)
        return out.logits[:, -1].float()


@dataclass
class _Sequence:
    """One sequence of the batch: its ids, settings, limit, random generator and result; in a
    beam phase it stands on ``num_beams`` rows of the batch, else on one."""

    buf: TokenBuffer  # (1, length)
    settings: dict[str, DecodeSettings]
    limit: int  # new tokens at most
    generator: torch.Generator
    constraint: ModalityConstraint
    stop_ids: list[int]
    result: DecodeResult = field(default_factory=lambda: DecodeResult([], [], LENGTH))
    phase: "_BeamPhase | None" = None
    uncond: list[int] | None = None  # the unconditional prompt of a guided sequence
    width: int = 1  # rows of the batch it stands on (the unconditional row, last, included)
    uncond_row: bool = False  # its last row is the unconditional one (inside a guided block)
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # leaves the batch at the next step, as it is

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def append(self, tokens: Sequence[int], modes: Sequence[str]) -> None:
        self.buf.append(np.asarray(tokens, dtype=np.int64)[None])
        self.result.ids.extend(int(t) for t in tokens)
        self.result.modes.extend(modes)

    @property
    def done(self) -> bool:
        return self.result.stopped == STOP or len(self.result.ids) >= self.limit or self.cancelled

    def guided_in(self, mode: str) -> bool:
        """A token in ``mode`` is chosen with guidance."""
        return self.guided and self.settings[mode].guided

    def next_mode(self, mode: str) -> str:
        """The mode of its next token, its last one chosen in ``mode``."""
        row = self.buf.rows()[0]
        return self.constraint.mode_after(mode, int(row[-2]), int(row[-1]))

    def unconditional_input(self) -> list[int]:
        """Its unconditional row's ids: the unconditional prompt and every token made so far."""
        assert self.uncond is not None
        return self.uncond + self.result.ids


@dataclass
class _Step:
    """What a sequence does next: the batch rows (its own, by index; None: a new row) its next
    rows continue, each row's new tokens, and the column from which a row forgets its past (None:
    keeps it)."""

    rows: list[int | None]
    tokens: list[list[int]]
    forget_from: int | None = None

    @staticmethod
    def after(s: _Sequence, tokens: list[int], mode: str, forget_from: int | None = None) -> _Step:
        """``s``'s conditional row (its first) goes on with ``tokens``, its next token to be
        chosen in ``mode``; its unconditional row goes on with them inside a guided block, joins
        when one opens, and leaves when it closes."""
        if not s.guided_in(mode):
            s.uncond_row = False
            return _Step([0], [tokens], forget_from)
        step = _Step([0, s.width - 1], [tokens, tokens], forget_from) if s.uncond_row else \
            _Step([0, None], [tokens, s.unconditional_input()], forget_from)
        s.uncond_row = True
        return step


class Decoder:
    """Runs the loop for one model; the constraint, per-modality settings and stop tokens given
    here are every sequence's unless :meth:`start` gives it its own."""

    def __init__(self, model: Any, constraint: ModalityConstraint | None = None,
                 settings: dict[str, DecodeSettings] | None = None, stop_ids: Sequence[int] = (),
                 use_cache: bool = True, keep_logits: bool = False) -> None:
        self.model = model
        self.constraint = constraint
        self.settings = settings or {}
        self.stop_ids = sorted({int(i) for i in stop_ids})
        self.use_cache = use_cache
        self.keep_logits = keep_logits
        self.device = next(model.parameters()).device
        self._processors: dict[DecodeSettings, tuple[Any, Any]] = {}
        self._rows = _Rows(model, self.device, use_cache)
        self._live: list[_Sequence] = []  # in row order
        self._waiting: list[_Sequence] = []  # joining at the next step
        self._logits: torch.Tensor | None = None  # (R, V) the live rows' next-token scores

    def _penalties(self, cfg: DecodeSettings) -> Any:
        return self._procs(cfg)[0]

    def _warpers(self, cfg: DecodeSettings) -> Any:
        return self._procs(cfg)[1]

    def _procs(self, cfg: DecodeSettings) -> tuple[Any, Any]:
        if cfg not in self._processors:
            self._processors[cfg] = (cfg.penalties(), cfg.warpers())
        return self._processors[cfg]

    # --- the loop ----------------------------------------------------------------------------
    def run(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, seed: int = 0,
            uncond_ids: Sequence[int] | np.ndarray | None = None) -> DecodeResult:
        """Decode after ``prompt_ids``; ``max_new_tokens`` is capped at what the model's positions
        allow (the cap is reported in the result's ``notes``). ``uncond_ids``: the unconditional
        prompt, needed when the settings guide a modality."""
        return self.run_batch([prompt_ids], max_new_tokens, [seed], uncond=[uncond_ids])[0]

    def run_batch(self, prompts: Sequence[Sequence[int] | np.ndarray], max_new_tokens: int, seeds: Sequence[int],
                  settings: Sequence[dict[str, DecodeSettings]] | None = None,
                  uncond: Sequence[Sequence[int] | np.ndarray | None] | None = None) -> list[DecodeResult]:
        """Decode after each prompt at once; ``seeds``, ``settings`` (default: the decoder's) and
        ``uncond`` (unconditional prompts, for sequences whose settings guide a modality) are
        per sequence. A sequence's tokens are those :meth:`run` gives it alone."""
        if not prompts or len(seeds) != len(prompts) or any(x is not None and len(x) != len(prompts)
                                                            for x in (settings, uncond)):
            raise ValueError(f"a batch needs at least one prompt and one seed (and settings, unconditional prompt) "
                             f"per prompt: got {len(prompts)} prompts, {len(seeds)} seeds")
        seqs = [self.start(ids, max_new_tokens, seeds[i], settings[i] if settings is not None else None,
                           uncond_ids=uncond[i] if uncond is not None else None)
                for i, ids in enumerate(prompts)]
        while self.busy:
            self.step()
        return [s.result for s in seqs]

    @property
    def busy(self) -> bool:
        """Some sequence is decoding or waiting to join."""
        return bool(self._live or self._waiting)

    @property
    def padding(self) -> int:
        """Columns the batch carries beyond its longest live sequence: masked-out columns of rows
        that joined late or of rows gone (they stay until the batch empties and starts afresh)."""
        longest = max((s.buf.length for s in self._live), default=0)
        return max(self._rows.length - longest, 0)

    def start(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, seed: int,
              settings: dict[str, DecodeSettings] | None = None, constraint: ModalityConstraint | None = None,
              stop_ids: Sequence[int] | None = None,
              uncond_ids: Sequence[int] | np.ndarray | None = None) -> _Sequence:
        """A sequence that joins the batch at the next step (its result fills in as it decodes);
        ``max_new_tokens`` is capped at what the model's positions allow (said in its ``notes``).
        ``uncond_ids``: the unconditional prompt, needed when the settings guide a modality."""
        prompt = _prompt_array(prompt_ids, "the prompt")
        constraint = constraint or self.constraint
        if constraint is None:
            raise ValueError("a sequence needs a modality constraint: give one to the Decoder or to start()")
        chosen = dict(settings if settings is not None else self.settings)
        guided = sorted(m for m, c in chosen.items() if c.guided)
        if guided and uncond_ids is None:
            raise ValueError(f"the settings guide {guided} (guidance != 1) but no unconditional prompt was given")
        uncond = _prompt_array(uncond_ids, "the unconditional prompt").tolist() if guided else None
        longest = max(prompt.size, len(uncond) if uncond is not None else 0)
        limit, note = bound_new_tokens(self.model, longest, max_new_tokens)
        seq = _Sequence(TokenBuffer(prompt[None]), chosen, limit,
                        torch.Generator(device=self.device).manual_seed(int(seed)), constraint,
                        sorted({int(i) for i in (self.stop_ids if stop_ids is None else stop_ids)}),
                        uncond=uncond)
        seq.uncond_row = seq.guided_in(constraint.state(prompt).mode)  # a prompt that opens a guided block
        seq.width = 1 + seq.uncond_row
        seq.result.notes += [note] if note else []
        self._waiting.append(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> list[_Sequence]:
        """One step: every live sequence chooses its next token(s) from the last scores, the done
        and cancelled ones leave, the waiting ones join with their prompts, and the model runs once
        over the rows. Returns the sequences that ended in this step (done or cancelled)."""
        index: list[int | None] = []
        first: list[int] = []  # the first token of each new row (None in ``index``)
        new: list[list[int]] = []
        forget: list[tuple[int, int]] = []
        kept: list[_Sequence] = []
        ended: list[_Sequence] = []
        if self._live:
            assert self._logits is not None
            logits, ids, offset = self._logits, self._rows.token_ids(), 0
            states = [self._lone_state(s) for s in self._live]
            starts = np.cumsum([0] + [s.width for s in self._live])[:-1]  # each sequence's first row
            lone = self._lone_steps([(p, s, st) for p, (s, st) in enumerate(zip(self._live, states)) if st is not None],
                                    logits, ids, starts)
            for p, s in enumerate(self._live):
                width = s.width
                step = None if s.cancelled else lone[p] if p in lone else \
                    self._advance(s, logits[offset:offset + width], ids[offset:offset + width], self._rows.length)
                if step is None:
                    s.result.seconds = time.perf_counter() - s.started
                    ended.append(s)
                else:
                    if step.forget_from is not None:
                        forget += [(len(index) + j, step.forget_from) for j in range(len(step.rows))]
                    index += [None if r is None else offset + r for r in step.rows]
                    first += [tokens[0] for r, tokens in zip(step.rows, step.tokens) if r is None]
                    new += step.tokens
                    s.width = len(step.rows)
                    kept.append(s)
                offset += width
        joining = [s for s in self._waiting if not s.cancelled]
        ended += [s for s in self._waiting if s.cancelled]
        self._waiting = []
        if not kept:  # an empty batch starts afresh: no columns, no cache
            self._rows = _Rows(self.model, self.device, self.use_cache)
        else:
            self._rows.select(index, first)
            for row, column in forget:
                self._rows.forget(row, column)
        self._live = kept + joining
        if not self._live:
            self._logits = None
            return ended
        # a joining sequence's rows: its prompt, and (opening a guided block) its unconditional one
        prompts = [row for s in joining for row in [s.buf.rows()[0].tolist()] + ([s.uncond] if s.uncond_row else [])]
        self._rows.select([*range(self._rows.ids.shape[0]), *[None] * len(prompts)], [row[0] for row in prompts])
        self._logits = self._rows.feed(new + prompts)  # (R, V)
        for s in self._live:
            s.result.forward_passes += 1
        return ended

    def cancel(self, s: _Sequence) -> None:
        """``s`` leaves the batch at the next step, its result as it stands."""
        s.cancelled = True

    def _advance(self, s: _Sequence, logits: torch.Tensor, ids: torch.Tensor, column: int) -> _Step | None:
        """Choose ``s``'s next token(s) from the scores of its rows (``logits`` (W, V), ``ids``
        (W, T)); None when the sequence is done. ``column``: the batch's next column."""
        if s.phase is None:
            if s.done:
                return None
            s.phase = _BeamPhase(self, s, s.constraint.state(s.buf.rows()[0]), column)
        step = s.phase.advance(logits, ids)  # outside guided blocks: no unconditional row
        if step is not None:
            return step
        # The phase ended: the sequence goes on with its best hypothesis.
        phase, s.phase = s.phase, None
        best = phase.best()
        s.result.beam_phases += 1
        modes = self._modes_of(s.constraint, phase.mode, phase.last, best)
        s.append(best, modes)
        if self.keep_logits:
            s.result.logits += [None] * len(best)
        if best[-1] in s.stop_ids:
            s.result.stopped = STOP
        if s.done:
            return None
        # It ended on a change of mode: one row goes on, its beam tokens forgotten, the chosen
        # hypothesis run through the model (and the unconditional row joins a guided block).
        return _Step.after(s, best, s.next_mode(modes[-1]), forget_from=phase.column)

    def _lone_state(self, s: _Sequence) -> BlockState | None:
        """The constraint state of a sequence whose next token is chosen alone (one row, no beam
        phase), else None (done, in a beam phase, or starting one: :meth:`_advance`)."""
        if s.phase is not None or s.done:
            return None
        state = s.constraint.state(s.buf.rows()[0])
        return state if s.settings[state.mode].num_beams == 1 else None

    def _lone_steps(self, todo: list[tuple[int, _Sequence, BlockState]], logits: torch.Tensor, ids: torch.Tensor,
                    starts: np.ndarray) -> dict[int, _Step | None]:
        """The next token of each sequence ``todo`` names (its position in the live list, itself, its
        state), keyed by position. Rows with equal settings (and constraint) are scored together, as
        (R, V), and the chosen tokens read once: each row's scores, and its own generator's draw, are
        what the row alone would give. A guided mode's scores start from ``uncond + s * (cond - uncond)``."""
        groups: dict[tuple[DecodeSettings, int], list[tuple[int, _Sequence, BlockState]]] = {}
        for item in todo:
            groups.setdefault((item[1].settings[item[2].mode], id(item[1].constraint)), []).append(item)
        out: dict[int, _Step | None] = {}
        for (cfg, _), items in groups.items():
            constraint = items[0][1].constraint
            at = [int(starts[p]) for p, _, _ in items]  # each sequence's one row
            rows = slice(at[0], at[-1] + 1) if at == list(range(at[0], at[0] + len(at))) else \
                torch.tensor(at, device=logits.device)
            raw = logits[rows]  # (R, V) the conditional rows
            if cfg.guided:  # every sequence in a guided mode has its unconditional row right after
                uncond = logits[torch.tensor(at, device=logits.device) + 1]  # (R, V)
                raw = uncond + cfg.guidance * (raw - uncond)
            if self.keep_logits:
                for (_, s, _), row in zip(items, raw.cpu()):
                    s.result.logits.append(row)
            scores = self._penalties(cfg)(ids[rows], raw)  # (R, V)
            keys = [constraint.allowed_key(state) for _, _, state in items]
            scores = scores + constraint.bias(keys, scores.shape[-1], scores.device, scores.dtype)
            if cfg.do_sample:
                probs = torch.softmax(self._warpers(cfg)(ids[rows], scores), dim=-1)
                chosen = torch.cat([torch.multinomial(probs[k:k + 1], num_samples=1, generator=s.generator)[0]
                                    for k, (_, s, _) in enumerate(items)]).tolist()
            else:
                chosen = scores.argmax(-1).tolist()
            for (p, s, state), token in zip(items, chosen):
                s.append([token], [state.mode])
                if state.mode == TEXT and token in s.stop_ids:
                    s.result.stopped = STOP
                out[p] = None if s.done else _Step.after(s, [token], s.next_mode(state.mode))
        return out

    def _phase_modes(self, settings: dict[str, DecodeSettings], cfg: DecodeSettings) -> set[str]:
        """The modes a beam phase with settings ``cfg`` may run through."""
        return {m for m, other in settings.items() if other == cfg}

    def _ends(self, s: _Sequence, states: list[BlockState], last: np.ndarray, beam: np.ndarray, token: np.ndarray,
              inside: set[str]) -> np.ndarray:
        """(K,) bool: candidate (beam, token) of ``s`` ends its hypothesis: a stop token, or a token
        after which the row is in a mode outside the phase's."""
        stops = set(s.stop_ids)
        return np.array([int(t) in stops or
                         s.constraint.mode_after(states[b].mode, int(last[b]), int(t)) not in inside
                         for b, t in zip(beam, token)], dtype=bool)

    def _modes_of(self, constraint: ModalityConstraint, mode: str, last: int, tokens: list[int]) -> list[str]:
        """The mode each of ``tokens`` was chosen in, the first in ``mode`` after ``last``."""
        modes = []
        for t in tokens:
            modes.append(mode)
            mode, last = constraint.mode_after(mode, last, t), t
        return modes


def _prompt_array(ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    prompt = np.asarray(ids, dtype=np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of ids, got shape {prompt.shape}")
    return prompt


class _BeamPhase:
    """One sequence's beam search, step by step, until its best hypothesis ends.

    Mirrors transformers' ``_beam_search`` for one sequence: log-softmax, processors, the top
    ``K`` continuations of all beams, hypotheses kept only from the top ``num_beams``,
    length-normalised scores, and its early-stopping rule.
    """

    def __init__(self, dec: Decoder, s: _Sequence, state: BlockState, column: int) -> None:
        self.dec = dec
        self.seq = s
        self.mode = state.mode
        self.cfg = s.settings[self.mode]
        self.inside = dec._phase_modes(s.settings, self.cfg)
        self.beams_n = self.cfg.num_beams
        self.prefix = s.buf.length  # L0: the sequence's length when the phase began
        self.last = int(s.buf.rows()[0, -1])
        self.budget = s.limit - len(s.result.ids)
        self.column = column  # the batch column of the phase's first token
        # Tokens that can end a hypothesis besides the stop tokens: block markers into or out
        # of modes with other settings (none when every mode has these settings, as in HF).
        enders = 0 if self.inside == set(s.settings) else 2
        self.k = max(2, 1 + len(s.stop_ids) + enders) * self.beams_n
        self.beams = TokenBuffer(np.repeat(s.buf.rows(), self.beams_n, axis=0))  # (B, L0 + step)
        self.running = torch.full((self.beams_n,), -1e9, device=dec.device)
        self.running[0] = 0.0  # only the first beam's continuations count at the first step
        self.pool: list[tuple[float, list[int]]] = []  # finished hypotheses (score, tokens), best first
        self.improvable = True
        self.step = 0

    def best(self) -> list[int]:
        return self.pool[0][1]

    def advance(self, logits: torch.Tensor, ids: torch.Tensor) -> _Step | None:
        """One step over the beams' scores ((1, V) at the first step, then (B, V)); None when
        the phase ends (its best hypothesis is then :meth:`best`)."""
        dec, cfg, B = self.dec, self.cfg, self.beams_n
        first = self.step == 0
        V = logits.shape[-1]
        if first:
            logits, ids = logits.expand(B, V), ids.expand(B, ids.shape[1])
        logp = torch.log_softmax(logits, dim=-1)
        logp = dec._penalties(cfg)(ids, logp)
        rows = self.beams.rows()
        constraint = self.seq.constraint
        states = constraint.states(rows)
        logp = logp + constraint.bias([constraint.allowed_key(x) for x in states], V, dec.device, logp.dtype)
        top_v, top_i = (logp + self.running[:, None]).view(-1).topk(self.k)  # (K,)
        beam, token = top_i // V, top_i % V
        ends = dec._ends(self.seq, states, rows[:, -1], beam.cpu().numpy(), token.cpu().numpy(), self.inside)
        ends = torch.from_numpy(ends | (self.step + 1 >= self.budget)).to(dec.device)  # (K,)
        if self.improvable and not (len(self.pool) >= B and cfg.early_stopping):
            scale = float(self.step + 1) ** cfg.length_penalty
            for i in torch.nonzero(ends[:B]).flatten().tolist():
                self.pool.append((float(top_v[i]) / scale, rows[int(beam[i]), self.prefix:].tolist() + [int(token[i])]))
            self.pool = sorted(self.pool, key=lambda h: -h[0])[:B]
        keep = (top_v - ends.float() * 1e9).topk(B).indices  # the best unfinished continuations
        self.running = top_v[keep] - ends[keep].float() * 1e9
        best_possible = float(self.running[0]) / float(self.step + 1) ** cfg.length_penalty
        self.improvable = self.improvable and (len(self.pool) < B or best_possible > min(h[0] for h in self.pool))
        if not self.improvable or (len(self.pool) >= B and cfg.early_stopping) or bool(ends.all()):
            return None
        order = beam[keep].cpu().numpy()
        tokens = token[keep].cpu().numpy()
        self.beams.reorder(order)
        self.beams.append(tokens[:, None])
        self.step += 1
        rows_of = [0] * B if first else order.tolist()  # at the first step every beam stands on the one row
        return _Step(rows_of, [[int(t)] for t in tokens])
