"""The prompt syntax of `mio generate`: where a prompt's media files go in its text."""

from __future__ import annotations

import re
from typing import Sequence

from mio.generate.media import MediaFile
from mio.segments import Box, BoxError, Text
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, VIDEO

# {image}: the next image file; <image_placeholder_0>: the first image file (MIO's release syntax);
# {box:x1,y1,x2,y2}: a box, coordinates normalized to the image it points at (a model with location tokens).
PLACEHOLDER = re.compile(r"\{(image|speech|video)\}|<(image|speech)_placeholder_(\d+)>|\{box:([^}]*)\}")


def prompt_box(spec: str) -> Box:
    """``x1,y1,x2,y2`` (normalized to [0, 1]) -> a Box; anything else is a clear error."""
    try:
        coords = tuple(float(v) for v in spec.split(","))
        return Box(coords)  # type: ignore[arg-type]
    except (ValueError, BoxError) as e:
        raise MioUserError(f"{{box:{spec}}}: a box is {{box:x1,y1,x2,y2}}, four numbers in [0, 1] with x2 >= x1 "
                           f"and y2 >= y1 ({e})") from None


def prompt_items(text: str, media: Sequence[MediaFile]) -> list[Text | MediaFile | Box]:
    """A prompt's text and its files -> the items in reading order.

    ``{image}``, ``{speech}``, ``{video}`` take the next file of that kind not yet placed;
    ``<image_placeholder_N>`` / ``<speech_placeholder_N>`` (MIO's ``infer.py``) take the N-th
    file of that kind, counting from 0; ``{box:x1,y1,x2,y2}`` is a box (what is in this region?).
    Files the text does not name follow it, in order.
    """
    by_kind = {k: [m for m in media if m.kind == k] for k in (IMAGE, SPEECH, VIDEO)}
    placed: set[int] = set()
    items: list[Text | MediaFile | Box] = []
    pos = 0
    for m in PLACEHOLDER.finditer(text):
        if m.group(4) is not None:
            if m.start() > pos:
                items.append(Text(text[pos:m.start()]))
            items.append(prompt_box(m.group(4)))
            pos = m.end()
            continue
        kind = m.group(1) or m.group(2)
        if m.group(1):
            free = [f for f in by_kind[kind] if id(f) not in placed]
            if not free:
                raise MioUserError(f"the prompt has more {{{kind}}} placeholders than {kind} files (--{kind})")
            chosen = free[0]
        else:
            index = int(m.group(3))
            if index >= len(by_kind[kind]):
                raise MioUserError(f"the prompt names {m.group(0)} but only {len(by_kind[kind])} {kind} file(s) were "
                                 f"given (--{kind}); the placeholders count from 0")
            chosen = by_kind[kind][index]
        if m.start() > pos:
            items.append(Text(text[pos:m.start()]))
        items.append(chosen)
        placed.add(id(chosen))
        pos = m.end()
    if pos < len(text):
        items.append(Text(text[pos:]))
    items += [m for m in media if id(m) not in placed]
    if not items:
        raise MioUserError("nothing to generate from: give a prompt and/or media files")
    return items
