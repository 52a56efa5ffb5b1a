"""mio's own layout (``layout: segments``, the default): a text field, a media field and its text,
a list of segment objects, or ChatML-like messages whose content is a string or segments."""

from __future__ import annotations

from mio.data.fields import as_media, as_text, original_size_field, seconds_field
from mio.data.inputs import SkipSample
from mio.data.layouts.registry import RowDraft, RowFields, conversation, document, register_layout, segment_item
from mio.segments import Text
from mio.vocab import IMAGE, SPEECH, VIDEO


@register_layout("segments", "text", {"text": "text"})
def text(row: RowFields) -> RowDraft:
    return RowDraft(row.where, [Text(as_text(row.get("text"), row.where, "text"))])


PAIR_KINDS = {"image_text": IMAGE, "speech_text": SPEECH, "video_text": VIDEO}


@register_layout("segments", "image_text", {"image": "image", "text": "text"})
@register_layout("segments", "video_text", {"video": "video", "text": "text"})
@register_layout("segments", "speech_text", {"speech": "audio", "text": "text"})
def pair(row: RowFields) -> RowDraft:
    """A media item and its text: ``fields.original_size`` for images a downloader resized,
    ``fields.start`` / ``fields.duration`` for a window of a long recording."""
    kind, f, where, values = PAIR_KINDS[row.recipe.data_type], row.fields, row.where, row.values
    text = as_text(row.get("text"), where, "text")
    ref = as_media(row.get(kind), kind, row.base, where, f[kind])
    ref.text = text
    if kind == IMAGE and "original_size" in f:
        ref.original_size = original_size_field(values, f["original_size"], where)
    if kind == SPEECH:
        ref.start = seconds_field(values, f.get("start"), where, "start")
        ref.duration = seconds_field(values, f.get("duration"), where, "duration")
    return RowDraft(where, [ref, Text(text)])


@register_layout("segments", "interleaved", {"segments": "segments"})
@register_layout("segments", "video_interleaved", {"segments": "segments"})
def segment_list(row: RowFields) -> RowDraft:
    segs = row.get("segments")
    if not isinstance(segs, list) or not segs:
        raise SkipSample("bad_field", f"{row.where}: {row.fields['segments']} must be a non-empty list of segments")
    return document(row.where, [segment_item(d, row.base, row.where, document=True) for d in segs])


@register_layout("segments", "sft", {"messages": "messages", "task": "task"})
def messages(row: RowFields) -> RowDraft:
    where = row.where
    task = row.get("task", required=False)
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise SkipSample("bad_field", f"{where}: messages must be a list of turns")
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            raise SkipSample("bad_conversation", f"{where}: turn {m!r} is not an object")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"text": content}]
        if not isinstance(content, list):
            raise SkipSample("bad_conversation", f"{where}: turn content must be a string or a list of segments")
        turns.append((str(m.get("role")), [segment_item(d, row.base, where) for d in content]))
    return conversation(where, turns, task)
