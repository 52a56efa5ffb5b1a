"""MMC4 (``layout: mmc4``): sentences, and images each matched to a sentence, placed before it."""

from __future__ import annotations

from mio.data.fields import as_text
from mio.data.inputs import SkipSample
from mio.data.layouts.registry import Item, RowDraft, RowFields, document, document_media, register_layout
from mio.segments import Text
from mio.vocab import IMAGE


@register_layout("mmc4", "interleaved", {"text_list": "text_list", "image_info": "image_info"})
def mmc4(row: RowFields) -> RowDraft:
    where = row.where
    sentences = row.get("text_list")
    infos = row.get("image_info")
    if not isinstance(sentences, list) or not isinstance(infos, list):
        raise SkipSample("bad_field", f"{where}: mmc4 rows need lists `text_list` and `image_info`")
    before: dict[int, list[Item]] = {}
    for info in infos:
        if not isinstance(info, dict) or "image_name" not in info or "matched_text_index" not in info:
            raise SkipSample("bad_field", f"{where}: mmc4 image_info entries need image_name and matched_text_index")
        before.setdefault(int(info["matched_text_index"]), []).append(
            document_media(info["image_name"], IMAGE, row.base, where, "image_name"))
    items: list[Item] = []
    for i, s in enumerate(sentences):
        items += before.get(i, [])
        items.append(Text((" " if items else "") + as_text(s, where, "text_list")))
    return document(where, items)
