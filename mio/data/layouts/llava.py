"""LLaVA-Instruct (``layout: llava``): ``{"image": ..., "conversations": [{"from": "human",
"value": "<image>\\n..."}, ...]}``; ``image_first`` puts the image at the start of its turn, as
LLaVA's own training code does."""

from __future__ import annotations

from mio.data.fields import as_media, as_text
from mio.data.inputs import SkipSample
from mio.data.layouts.registry import Item, RowDraft, RowFields, conversation, register_layout
from mio.segments import Text
from mio.vocab import IMAGE

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_IMAGE = "<image>"  # where LLaVA's text places its image (its own marker, not mio's token)


@register_layout("llava", "sft", {"conversations": "conversations", "image": "image", "task": "task"})
def llava(row: RowFields) -> RowDraft:
    where = row.where
    task = row.get("task", required=False)
    convs = row.get("conversations")
    image = row.get("image", required=False)
    if not isinstance(convs, list):
        raise SkipSample("bad_field", f"{where}: conversations must be a list")
    turns = []
    for m in convs:
        if not isinstance(m, dict) or m.get("from") not in LLAVA_ROLES:
            raise SkipSample("bad_conversation", f"{where}: turn {m!r} has no known `from`")
        text = as_text(m.get("value", ""), where, "value")
        items: list[Item] = []
        if LLAVA_IMAGE in text and image is not None:
            ref = as_media(image, IMAGE, row.base, where, "image")
            if row.recipe.image_first:  # LLaVA's own training code: "<image>\n" + the turn without it
                items.append(ref)
                text = text.replace(LLAVA_IMAGE, "").strip()
            else:
                before, _, after = text.partition(LLAVA_IMAGE)
                items += ([Text(before)] if before.strip() else []) + [ref]
                text = after.lstrip("\n")
        if text:
            items.append(Text(text))
        turns.append((LLAVA_ROLES[m["from"]], items))
    return conversation(where, turns, task)
