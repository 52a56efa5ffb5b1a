"""OBELICS (``layout: obelics``): aligned lists, ``texts[i]`` or ``images[i]`` set, the other null."""

from __future__ import annotations

from mio.data.fields import as_text
from mio.data.inputs import SkipSample
from mio.data.layouts.registry import Item, RowDraft, RowFields, document, document_media, register_layout
from mio.segments import Text
from mio.vocab import IMAGE


@register_layout("obelics", "interleaved", {"texts": "texts", "images": "images"})
def obelics(row: RowFields) -> RowDraft:
    where = row.where
    texts = row.get("texts")
    images = row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SkipSample("bad_field", f"{where}: obelics rows need equal-length lists `texts` and `images`")
    items: list[Item] = []
    for t, im in zip(texts, images):
        if im is not None:
            items.append(document_media(im, IMAGE, row.base, where, "images"))
        elif t is not None:
            items.append(Text(as_text(t, where, "texts")))
    return document(where, items)
