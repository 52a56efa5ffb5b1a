"""An answer as the web side sends it: pieces of text, images and speech, in the order the model
interleaved them, whole (a finished :class:`Generation`) or settled so far (the ids of an answer
still being decoded, for streaming).

A video (consecutive image blocks) is sent as its frames, one image piece each, so that what
streaming sends as each block closes is what the whole answer holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mio.segments import Image, Segment, Speech, Text, TextDecoder, Video, parse
from mio.vocab import IMAGE, SPEECH, TEXT, VocabTable


@dataclass
class Piece:
    kind: str  # text, image or speech
    text: str = ""
    segment: Segment | None = None  # an Image or a Speech


def pieces(segments: Sequence[Segment]) -> list[Piece]:
    out: list[Piece] = []
    for s in segments:
        if isinstance(s, Text):
            if out and out[-1].kind == TEXT:
                out[-1].text += s.text
            else:
                out.append(Piece(TEXT, s.text))
        elif isinstance(s, Video):
            out += [Piece(IMAGE, segment=Image(frame)) for frame in s.frames]
        elif isinstance(s, Image):
            out.append(Piece(IMAGE, segment=s))
        elif isinstance(s, Speech):
            out.append(Piece(SPEECH, segment=s))
    return out


def settled_ids(ids: Sequence[int], table: VocabTable, stop_ids: Sequence[int]) -> list[int]:
    """The part of an answer decoded so far that will not change: without a trailing stop token
    and without a media block still open."""
    ids = list(ids)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    markers = {table.image_begin, table.image_end, table.speech_begin, table.speech_end}
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in markers:
            return ids[:i] if ids[i] in (table.image_begin, table.speech_begin) else ids
    return ids


class Streamer:
    """What of an answer has been sent, and what is new: text as deltas, each media piece once."""

    def __init__(self, table: VocabTable, tokenizer: object, text_decoder: TextDecoder,
                 stop_ids: Sequence[int]) -> None:
        self.table, self.tokenizer, self.decode = table, tokenizer, text_decoder
        self.stop_ids = set(stop_ids)
        self.sent_pieces = 0  # pieces sent whole
        self.sent_chars = 0  # characters of the next piece (a text) already sent

    def so_far(self, ids: Sequence[int]) -> list[Piece]:
        settled = settled_ids(ids, self.table, self.stop_ids)
        return pieces(parse(settled, self.table, self.tokenizer, decode=self.decode)) if settled else []

    def new(self, current: list[Piece], final: bool) -> list[Piece]:
        """The pieces (or the end of a text piece) not sent yet. A text still being decoded keeps
        back a trailing replacement character: the rest of its UTF-8 sequence is to come."""
        out: list[Piece] = []
        for i in range(self.sent_pieces, len(current)):
            p = current[i]
            last = i == len(current) - 1 and not final
            if p.kind == TEXT:
                text = p.text.rstrip("\ufffd") if last else p.text
                if len(text) > self.sent_chars:
                    out.append(Piece(TEXT, text[self.sent_chars:]))
                    self.sent_chars = len(text)
                if last:
                    break
            else:
                out.append(p)
            self.sent_pieces, self.sent_chars = i + 1, 0
        return out
