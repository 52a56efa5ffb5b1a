"""Text / Image / Speech / Video segments <-> token ids, with a loss mask.

Sequences (DESIGN.md): an image is ``<image>`` + 32 codes + ``</image>``; a video is
consecutive image blocks; speech is ``<spch>`` + codes + ``</spch>`` where the codes are the
content layer only (speech as input) or all layers one after another (speech as output). A box
(a table with location tokens only) is ``<box>`` + its location tokens + ``</box>``, and a box
linked to a phrase ``<phrase>text</phrase><box>...</box>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from mio.vocab import BLOCK_MARKERS, BOX_BEGIN, BOX_END, IGNORE_INDEX, PHRASE_BEGIN, PHRASE_END, VocabError, VocabTable
from tokenizers import Tokenizer


# Segments compare by content and loss flag (a test comparing segments also checks the mask); the
# media compare their codes as arrays.
@dataclass(frozen=True, eq=False)
class Text:
    text: str
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and self.text == other.text and self.loss == other.loss


@dataclass(frozen=True, eq=False)
class Image:
    codes: np.ndarray  # (32,) image codes
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and np.array_equal(self.codes, other.codes) and self.loss == other.loss


@dataclass(frozen=True, eq=False)
class Speech:
    codes: np.ndarray  # (L, T): L=1 content codes (input) or L=4 layers (output)
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Speech) and np.array_equal(self.codes, other.codes) and self.loss == other.loss


@dataclass(frozen=True, eq=False)
class Video:
    frames: np.ndarray  # (F, 32) image codes of F key frames
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Video) and np.array_equal(self.frames, other.frames) and self.loss == other.loss


class BoxError(ValueError):
    """Box coordinates that are not a box: outside [0, 1], or x2 < x1 or y2 < y1."""


@dataclass(frozen=True, eq=False)
class Box:
    """A region of the image it refers to, as (x1, y1, x2, y2) normalized to [0, 1] in the
    ORIGINAL image's frame (x right, y down; (x1, y1) the top-left corner). Rendered as its
    location tokens (see :class:`mio.vocab.LocationTokens`), it reads back within half a bin.
    ``phrase``: the text the box grounds, written ``<phrase>phrase</phrase>`` before the box (a
    grounded caption is texts and phrase-linked boxes). Input ("what is in <box>...</box>?") or
    output ("where is the cat?" -> a box) like any segment."""

    coords: tuple[float, float, float, float]
    phrase: str | None = None
    loss: bool = True

    def __post_init__(self) -> None:
        c = tuple(float(v) for v in self.coords)
        if len(c) != 4 or not all(0.0 <= v <= 1.0 for v in c) or c[2] < c[0] or c[3] < c[1]:
            raise BoxError(f"a box is (x1, y1, x2, y2) in [0, 1] with x2 >= x1 and y2 >= y1, got {self.coords}")
        object.__setattr__(self, "coords", c)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and self.coords == other.coords and self.phrase == other.phrase

    def prefix(self) -> str:
        """The text written before the box: its phrase in markers, or nothing."""
        return "" if self.phrase is None else f"{PHRASE_BEGIN}{self.phrase}{PHRASE_END}"


Segment = Union[Text, Image, Speech, Video, Box]


@dataclass
class Rendered:
    """A rendered sequence: ids and, per token, whether it is supervised."""

    input_ids: np.ndarray  # (n,) int64
    loss_mask: np.ndarray  # (n,) bool

    @property
    def labels(self) -> np.ndarray:
        """HF-style labels aligned with input_ids: IGNORE_INDEX where unsupervised."""
        return np.where(self.loss_mask, self.input_ids, IGNORE_INDEX)


# --- segments -> ids ---------------------------------------------------------------------------
def segment_ids(seg: Segment, table: VocabTable, where: str = "sample") -> np.ndarray:
    """A media segment -> its token ids (1-D int64): the block markers around its codes."""
    if isinstance(seg, Image):
        codes = np.asarray(seg.codes)
        if codes.ndim != 1:
            raise VocabError(f"{where}: image codes must be 1-D, got shape {codes.shape}")
        return _image_blocks(codes[None], table, where)
    if isinstance(seg, Video):
        frames = np.asarray(seg.frames)
        if frames.ndim != 2 or frames.shape[0] == 0:
            raise VocabError(f"{where}: video frames must be a non-empty (F, codes) array, got shape {frames.shape}")
        return _image_blocks(frames, table, where)
    if isinstance(seg, Speech):
        codes = np.asarray(seg.codes)
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise VocabError(f"{where}: speech codes must be a non-empty (layers, frames) array, got shape {codes.shape}")
        out = np.empty(codes.size + 2, dtype=np.int64)
        out[0], out[-1] = table.speech_begin, table.speech_end
        out[1:-1] = table.speech_ids(codes, where).reshape(-1)  # layer-major: a1..an b1..bn ...
        return out
    if isinstance(seg, Box):
        codes = table.locations.encode(seg.coords) + table.location_start
        return np.concatenate([[table.specials[BOX_BEGIN]], codes, [table.specials[BOX_END]]]).astype(np.int64)
    raise VocabError(f"{where}: unknown segment type {type(seg).__name__}")


def _image_blocks(frames: np.ndarray, table: VocabTable, where: str) -> np.ndarray:
    """(F, C) image codes -> F blocks ``<image> codes </image>``, one after another (F * (C+2),)."""
    out = np.empty((frames.shape[0], frames.shape[1] + 2), dtype=np.int64)
    out[:, 0], out[:, -1] = table.image_begin, table.image_end
    out[:, 1:-1] = table.image_ids(frames, where)
    return out.reshape(-1)


def text_form(segments: Sequence[Segment], table: VocabTable) -> str:
    """The string a sample stands for: its texts, and each media block written as its token
    strings (``<image><img12>...</image>``). Rendering gives exactly ``tokenizer(text_form)``."""
    names = table.added_tokens()
    return "".join(seg.text if isinstance(seg, Text) else
                   (seg.prefix() if isinstance(seg, Box) else "")
                   + "".join(names[i - table.text_size] for i in segment_ids(seg, table).tolist())
                   for seg in segments)


@dataclass
class RenderDraft:
    """A sample's segments made ready for the one batched tokenizer call that renders many.

    ``text`` is the sample's text form with each media block written as ONE stand-in token (a
    placeholder token of the table): added tokens split the text before the tokenizer's normalizer and
    pre-tokenizer run, so one added token in place of a block's added tokens leaves every text
    piece's tokenization as it is. The block's ids are spliced in where the stand-in's id lands.
    Without a stand-in (``blocks`` empty) the blocks are written in full.
    """

    segments: Sequence[Segment]
    text: str
    blocks: list[np.ndarray]  # ids of each media block, in order, when a stand-in writes them
    lengths: list[int]  # characters of each segment in ``text``
    loss: list[bool]  # each segment's loss flag
    where: str

    @property
    def uniform(self) -> bool:
        """Every character has the same loss flag (pretraining samples): no offsets needed."""
        return all(self.loss) or not any(self.loss)


def _unpadded(backend: Tokenizer) -> Tokenizer:
    """A copy of a `tokenizers` backend that neither pads nor truncates. Called directly, a backend
    applies the settings its tokenizer.json ships or the last padded call of its transformers
    tokenizer left on it (transformers resets them per call; a direct call does not)."""
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


class SegmentRenderer:
    """Segments -> token ids and loss mask, exactly as the tokenizer encodes their text form.

    ``render(segments)`` equals ``tokenizer(text_form(segments))["input_ids"]`` (property-tested
    on SentencePiece, byte-level and split-regex BPE tokenizers), BOS included: the tokenizer's own
    special-token handling is used, never a second rule. Loss masks follow character spans:
    a token is supervised when any character it covers belongs to a supervised segment (a token
    that covers no character counts as covering the one at its position); tokens the tokenizer
    adds itself (BOS) are never supervised. So a token straddling unsupervised and supervised
    text is supervised: the model learns to produce all of the supervised text.

    Many samples render with one tokenizer call: :meth:`draft` each, then :meth:`finish` them.
    """

    def __init__(self, tokenizer: Any, table: VocabTable) -> None:
        self.tokenizer, self.table = tokenizer, table
        self.names = table.added_tokens()  # (added id - text_size) -> token string
        probe = [table.image_begin, table.image_start, table.speech_end_id - 1, table.total_size - 1]
        got = tokenizer.convert_tokens_to_ids([self.names[i - table.text_size] for i in probe])
        if got != probe:
            raise VocabError(f"the text tokenizer ({len(tokenizer)} tokens) does not hold mio's tokens at the ids of "
                             f"the vocabulary table (ids {probe}, tokenizer {got}): use the extended backbone's "
                             "tokenizer, or extend it first (mio.vocab.extend_tokenizer)")
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a `tokenizers` Tokenizer, when there is one
        self.backend = None if backend is None or getattr(tokenizer, "split_special_tokens", False) else \
            _unpadded(backend)
        self.stand_in = self._stand_in()

    def _stand_in(self) -> tuple[str, int] | None:
        """The token that stands in for a media block, or None when it would not split text as
        the media tokens do (their added-token settings differ): blocks are then written in full."""
        decoder = self.tokenizer.added_tokens_decoder  # id -> AddedToken
        t = self.table
        stand_in = next((i for name, i in t.specials.items() if name not in BLOCK_MARKERS), None)  # a placeholder
        media = [t.image_begin, t.image_end, t.image_start, t.speech_begin, t.speech_end, t.speech_start]
        settings = {_splitting(decoder.get(i)) for i in [stand_in, *media]}
        if stand_in is None or len(settings) != 1 or None in settings:
            return None
        return self.names[stand_in - t.text_size], stand_in

    def draft(self, segments: Sequence[Segment], where: str = "sample", in_full: bool = False) -> RenderDraft:
        """Check and map the media of one sample (a bad code raises a VocabError naming ``where``)."""
        stand_in = None if in_full else self.stand_in
        pieces: list[str] = []
        blocks: list[np.ndarray] = []
        for seg in segments:
            if isinstance(seg, Text):
                pieces.append(seg.text)
                continue
            ids = segment_ids(seg, self.table, where)
            prefix = seg.prefix() if isinstance(seg, Box) else ""  # a phrase: text, tokenized with the rest
            if stand_in is None:
                pieces.append(prefix + "".join(self.names[i - self.table.text_size] for i in ids.tolist()))
            else:
                pieces.append(prefix + stand_in[0])
                blocks.append(ids)
        return RenderDraft(segments, "".join(pieces), blocks, [len(p) for p in pieces], [seg.loss for seg in segments],
                     where)

    def finish(self, drafts: Sequence[RenderDraft]) -> list[Rendered]:
        """Render drafted samples with one batched tokenizer call (two when some need offsets)."""
        out: list[Rendered] = [EMPTY] * len(drafts)
        for mixed in (False, True):
            todo = [i for i, d in enumerate(drafts) if d.uniform != mixed]
            if todo:
                encodings = self._encode([drafts[i].text for i in todo], offsets=mixed)
                for i, encoding in zip(todo, encodings):
                    out[i] = self._assemble(drafts[i], *encoding)
        return out

    def __call__(self, segments: Sequence[Segment], where: str = "sample") -> Rendered:
        return self.finish([self.draft(segments, where)])[0]

    def _encode(self, texts: list[str], offsets: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(ids, mask of the tokens the tokenizer added, (n, 2) character offsets or None) per text."""
        if self.backend is not None:
            encode = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
            return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.special_tokens_mask, dtype=bool),
                     np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) if offsets else None)
                    for e in encode(texts, add_special_tokens=True)]
        if offsets:  # a Python tokenizer: ids yes, character offsets no
            raise VocabError(f"{type(self.tokenizer).__name__} gives no character offsets, which the loss mask of a "
                             "sample with supervised and unsupervised text (SFT) needs; use a fast (tokenizers-"
                             "backed) tokenizer")
        enc = self.tokenizer(texts, add_special_tokens=True, return_special_tokens_mask=True)
        return [(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=bool), None)
                for i, m in zip(enc["input_ids"], enc["special_tokens_mask"])]

    def _assemble(self, draft: RenderDraft, ids: np.ndarray, added: np.ndarray, offsets: np.ndarray | None) -> Rendered:
        if offsets is None:  # every character has one flag
            mask = ~added if any(draft.loss) else np.zeros(len(ids), dtype=bool)
        else:
            mask = _span_mask(draft, offsets) & ~added
        if not draft.blocks:
            return Rendered(ids, mask)
        at = ids == self.stand_in[1]  # type: ignore[index]
        if int(at.sum()) != len(draft.blocks):  # the text itself holds the stand-in's string
            full = self.draft(draft.segments, draft.where, in_full=True)
            return self._assemble(full, *self._encode([full.text], offsets=not full.uniform)[0])
        counts = np.ones(len(ids), dtype=np.int64)
        counts[at] = [len(b) for b in draft.blocks]
        input_ids = np.repeat(ids, counts)
        input_ids[np.repeat(at, counts)] = np.concatenate(draft.blocks)
        return Rendered(input_ids, np.repeat(mask, counts))


EMPTY = Rendered(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))


def _splitting(token: Any) -> tuple[bool, ...] | None:
    """The settings of an added token that decide how it splits text (None: not an added token)."""
    if token is None:
        return None
    return token.normalized, token.lstrip, token.rstrip, token.single_word


def _span_mask(draft: RenderDraft, offsets: np.ndarray) -> np.ndarray:
    """(n,) bool: tokens covering a character of a supervised segment (offsets (n, 2) into draft.text)."""
    length = len(draft.text)
    if length == 0:
        return np.zeros(len(offsets), dtype=bool)
    per_char = np.repeat(np.asarray(draft.loss, dtype=bool), draft.lengths)  # (length,)
    before = np.concatenate([[0], np.cumsum(per_char)])  # supervised characters before each offset
    start = np.minimum(offsets[:, 0], length - 1)
    end = np.maximum(offsets[:, 1], start + 1)
    return before[end] > before[start]


class ParseError(VocabError):
    """Token ids that do not form valid segments; ``position`` is the offending index."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at token {position})")
        self.position = position


def parse(ids: Sequence[int] | np.ndarray, table: VocabTable, tokenizer: Any,
          tokens_per_image: int = 32, decode: TextDecoder | None = None) -> list[Segment]:
    """Token ids -> segments, the inverse of :class:`SegmentRenderer` on its canonical form.

    Tokens the tokenizer puts before any text (BOS) are dropped. Consecutive image blocks become
    one :class:`Video`; speech blocks give (1, T) codes when they hold content codes only and
    (L, T) when they hold L layers in order, each as long as the first. Each text becomes the
    string the tokenizer encodes to its ids, in its place (see :class:`TextDecoder`). Raises
    :class:`ParseError` on anything else. ``decode``: the tokenizer's :class:`TextDecoder`, for a
    caller that parses many answers (building one reads every added token).
    """
    ids = np.asarray(ids, dtype=np.int64)
    decode = decode or TextDecoder(tokenizer)
    out: list[Segment] = []
    frames: list[np.ndarray] = []
    first = len(decode.leading) if ids[:len(decode.leading)].tolist() == decode.leading else 0
    i = text_start = first
    n = len(ids)

    def flush_text(end: int) -> None:
        if end > text_start:
            after = int(ids[text_start - 1]) if text_start > first else None  # a block's end token
            text = decode(ids[text_start:end].tolist(), after)
            if text:
                out.append(Text(text))

    def flush_frames() -> None:
        if len(frames) == 1:
            out.append(Image(frames[0]))
        elif frames:
            out.append(Video(np.stack(frames)))
        frames.clear()

    while i < n:
        tok = int(ids[i])
        if tok == table.image_begin:
            flush_text(i)
            end = i + 1 + tokens_per_image
            if end >= n or ids[end] != table.image_end:
                raise ParseError(f"<image> must be followed by {tokens_per_image} image codes and </image>", i)
            frames.append(table.image_codes(_expect(table.is_image, ids[i + 1:end], i + 1, "image code")))
            i = text_start = end + 1
            if i >= n or ids[i] != table.image_begin:
                flush_frames()
            continue
        if tok == table.speech_begin:
            flush_text(i)
            end = i + 1
            while end < n and table.is_speech(ids[end]):
                end += 1
            if end >= n or ids[end] != table.speech_end:
                raise ParseError("<spch> must be followed by speech codes and </spch>", i)
            out.append(Speech(_speech_layers(ids[i + 1:end], table, i + 1)))
            i = text_start = end + 1
            continue
        if table.has_locations and tok in (table.specials[BOX_BEGIN], table.specials[PHRASE_BEGIN]):
            flush_text(i)
            box, i = _parse_box(ids, i, table, decode)
            out.append(box)
            text_start = i
            continue
        if tok in table.specials.values() or table.is_image(tok) or table.is_speech(tok) or table.is_location(tok):
            raise ParseError(f"token {tok} ({table.describe(tok)[0]}) outside a media block", i)
        i += 1
    flush_text(n)
    return out


class TextDecoder:
    """Text ids -> the string the tokenizer encodes to exactly those ids, in their place.

    ``tokenizer.decode`` alone is not that: a SentencePiece decoder strips one leading space
    from what it decodes (the dummy prefix), right at the start of a text but wrong after an
    added token when the tokenizer prepends the prefix only at the start (``legacy: false``).
    So each run of ordinary tokens between added tokens is decoded, and the decoded string or
    the string with that space put back is chosen by which one encodes to the run again after
    the token before it. Where neither does (a tokenizer that does not round-trip), the decoded
    string is kept.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        probe = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
        flags = probe["special_tokens_mask"]
        self.leading: list[int] = probe["input_ids"][:flags.index(0) if 0 in flags else len(flags)]

    def __call__(self, ids: list[int], after: int | None = None) -> str:
        """``after``: the added token right before ``ids`` (None: they start the text)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.added:
                out += [self._run(run, after), self.added[i]]
                run, after = [], i
            else:
                run.append(i)
        out.append(self._run(run, after))
        return "".join(out)

    def _run(self, run: list[int], after: int | None) -> str:
        if not run:
            return ""
        text = self.tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for candidate in (text, " " + text):
            if self._encode(candidate, after) == run:
                return candidate
        return text

    def _encode(self, text: str, after: int | None) -> list[int]:
        if after is None:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(self.added[after] + text, add_special_tokens=False)["input_ids"][1:]


def _parse_box(ids: np.ndarray, i: int, table: VocabTable, decode: TextDecoder) -> tuple[Box, int]:
    """``[<phrase> text </phrase>] <box> locations </box>`` at ``i`` -> (the Box, the index after it)."""
    phrase = None
    begin, end = table.specials[BOX_BEGIN], table.specials[BOX_END]
    if ids[i] == table.specials[PHRASE_BEGIN]:
        close = np.flatnonzero(ids[i + 1:] == table.specials[PHRASE_END])
        if close.size == 0:
            raise ParseError("<phrase> without </phrase>", i)
        j = i + 1 + int(close[0])
        inner = ids[i + 1:j]
        if np.isin(inner, list(table.specials.values())).any():
            raise ParseError("a phrase holds a block or box marker", i)
        phrase = decode(inner.tolist(), int(ids[i]))
        if j + 1 >= len(ids) or ids[j + 1] != begin:
            raise ParseError("</phrase> must be followed by <box>", j)
        i = j + 1
    per_box = table.locations.per_box
    stop = i + 1 + per_box
    if stop >= len(ids) or ids[stop] != end:
        raise ParseError(f"<box> must be followed by {per_box} location tokens and </box>", i)
    codes = _expect(table.is_location, ids[i + 1:stop], i + 1, "location token") - table.location_start
    try:
        return Box(table.locations.decode(codes), phrase), stop + 1
    except BoxError as e:
        raise ParseError(str(e), i) from None


def _expect(pred: Any, ids: np.ndarray, offset: int, what: str) -> np.ndarray:
    ok = pred(ids)
    if not np.all(ok):
        raise ParseError(f"expected {what}, got token {int(ids[~ok][0])}", offset + int(np.argmin(ok)))
    return ids


def _speech_layers(ids: np.ndarray, table: VocabTable, offset: int) -> np.ndarray:
    """Body of a speech block -> (L, T) codes; layers must come in order, all of one length."""
    if len(ids) == 0:
        raise ParseError("empty speech block", offset)
    layers, codes = table.speech_codes(ids)
    starts = np.flatnonzero(np.diff(layers)) + 1
    runs = np.split(np.arange(len(ids)), starts)
    run_layers = [int(layers[r[0]]) for r in runs]
    if run_layers != list(range(len(runs))):
        raise ParseError(f"speech layers come as {run_layers}, expected 0..{len(runs) - 1} in order", offset)
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise ParseError(f"speech layers differ in length: {[len(r) for r in runs]}", offset)
    return codes.reshape(len(runs), -1)


def canonical(segments: Sequence[Segment]) -> list[Segment]:
    """The form :func:`parse` returns: adjacent texts merged, adjacent images/videos merged
    into one video, empty texts dropped, loss flags reset."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Text):
            if not seg.text:
                continue
            if out and isinstance(out[-1], Text):
                out[-1] = Text(out[-1].text + seg.text)
                continue
            out.append(Text(seg.text))
        elif isinstance(seg, (Image, Video)):
            frames = np.asarray(seg.codes)[None] if isinstance(seg, Image) else np.asarray(seg.frames)
            if out and isinstance(out[-1], (Image, Video)):
                prev = out.pop()
                prev_frames = prev.codes[None] if isinstance(prev, Image) else prev.frames
                frames = np.concatenate([prev_frames, frames])
            out.append(Image(frames[0]) if len(frames) == 1 else Video(frames))
        elif isinstance(seg, Box):
            out.append(Box(seg.coords, seg.phrase))
        else:
            out.append(Speech(np.asarray(seg.codes)))
    return out
