"""Text / Image / Speech / Video segments <-> token ids, with a loss mask.

Sequences (DESIGN.md): an image is ``<image>`` + 32 codes + ``</image>``; a video is
consecutive image blocks; speech is ``<spch>`` + codes + ``</spch>`` where the codes are the
content layer only (speech as input) or all layers one after another (speech as output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from mio.vocab import VocabError, VocabTable


@dataclass(frozen=True, eq=False)
class Text:
    text: str
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and self.text == other.text


@dataclass(frozen=True, eq=False)
class Image:
    codes: np.ndarray  # (32,) image codes
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and np.array_equal(self.codes, other.codes)


@dataclass(frozen=True, eq=False)
class Speech:
    codes: np.ndarray  # (L, T): L=1 content codes (input) or L=4 layers (output)
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Speech) and np.array_equal(self.codes, other.codes)


@dataclass(frozen=True, eq=False)
class Video:
    frames: np.ndarray  # (F, 32) image codes of F key frames
    loss: bool = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Video) and np.array_equal(self.frames, other.frames)


Segment = Union[Text, Image, Speech, Video]


@dataclass
class Rendered:
    """A rendered sequence: ids and, per token, whether it is supervised."""

    input_ids: np.ndarray  # (n,) int64
    loss_mask: np.ndarray  # (n,) bool

    @property
    def labels(self) -> np.ndarray:
        """HF-style labels aligned with input_ids: -100 where unsupervised."""
        return np.where(self.loss_mask, self.input_ids, -100)


class TextEncoder:
    """Text -> ids through a Hugging Face tokenizer, caching short strings.

    Templates and chat markup repeat the same few short strings in every sample, so a
    bounded cache of short strings takes most tokenizer calls off the data pipeline's path.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 4096, max_cached_chars: int = 96) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, np.ndarray] = {}
        self.cache_size = cache_size
        self.max_cached_chars = max_cached_chars

    def __call__(self, text: str) -> np.ndarray:
        hit = self.cache.get(text)
        if hit is not None:
            return hit
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(text) <= self.max_cached_chars and len(self.cache) < self.cache_size:
            self.cache[text] = ids
        return ids


def segment_ids(seg: Segment, table: VocabTable, encode: TextEncoder, where: str = "sample") -> np.ndarray:
    """One segment -> its token ids (1-D int64)."""
    if isinstance(seg, Text):
        return encode(seg.text)
    if isinstance(seg, Image):
        return _image_block(seg.codes, table, where)
    if isinstance(seg, Video):
        frames = np.asarray(seg.frames)
        if frames.ndim != 2 or frames.shape[0] == 0:
            raise VocabError(f"{where}: video frames must be a non-empty (F, codes) array, got shape {frames.shape}")
        return np.concatenate([_image_block(f, table, where) for f in frames])
    if isinstance(seg, Speech):
        codes = np.asarray(seg.codes)
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise VocabError(f"{where}: speech codes must be a non-empty (layers, frames) array, got shape {codes.shape}")
        body = table.speech_ids(codes, where).reshape(-1)  # layer-major: a1..an b1..bn ...
        return np.concatenate([[table.speech_begin], body, [table.speech_end]]).astype(np.int64)
    raise VocabError(f"{where}: unknown segment type {type(seg).__name__}")


def _image_block(codes: np.ndarray, table: VocabTable, where: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 1:
        raise VocabError(f"{where}: image codes must be 1-D, got shape {codes.shape}")
    return np.concatenate([[table.image_begin], table.image_ids(codes, where), [table.image_end]]).astype(np.int64)


def render(segments: Sequence[Segment], table: VocabTable, encode: TextEncoder,
           bos_id: int | None = None, eos_id: int | None = None, where: str = "sample") -> Rendered:
    """Segments -> ids and loss mask. BOS is never supervised; EOS follows the last segment's loss."""
    pieces: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    if bos_id is not None:
        pieces.append(np.array([bos_id], dtype=np.int64))
        masks.append(np.zeros(1, dtype=bool))
    for seg in segments:
        ids = segment_ids(seg, table, encode, where)
        pieces.append(ids)
        masks.append(np.full(len(ids), seg.loss, dtype=bool))
    if eos_id is not None:
        pieces.append(np.array([eos_id], dtype=np.int64))
        masks.append(np.full(1, bool(segments) and segments[-1].loss, dtype=bool))
    if not pieces:
        return Rendered(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    return Rendered(np.concatenate(pieces), np.concatenate(masks))


class ParseError(VocabError):
    """Token ids that do not form valid segments; ``position`` is the offending index."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at token {position})")
        self.position = position


def parse(ids: Sequence[int] | np.ndarray, table: VocabTable, tokenizer: Any,
          tokens_per_image: int = 32) -> list[Segment]:
    """Token ids -> segments, the inverse of :func:`render` on its canonical form.

    Consecutive image blocks become one :class:`Video`; speech blocks give (1, T) codes when
    they hold content codes only and (L, T) when they hold L layers in order, each as long as
    the first. Raises :class:`ParseError` on anything else.
    """
    ids = np.asarray(ids, dtype=np.int64)
    out: list[Segment] = []
    frames: list[np.ndarray] = []
    i, n = 0, len(ids)
    text_start = 0

    def flush_text(end: int) -> None:
        if end > text_start:
            out.append(Text(tokenizer.decode(ids[text_start:end].tolist())))

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
        if tok in table.specials.values() or table.is_image(tok) or table.is_speech(tok):
            raise ParseError(f"token {tok} ({table.describe(tok)[0]}) outside a media block", i)
        i += 1
    flush_text(n)
    return out


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
        else:
            out.append(Speech(np.asarray(seg.codes)))
    return out
