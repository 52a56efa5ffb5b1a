"""Rows -> drafts (segments with media still as references), by the reader of the recipe's layout.

A *layout* is how a published dataset spells its rows (OBELICS' aligned lists, MMC4's sentences
and matched images, LLaVA's conversations, mio's own segment lists). Each reader is registered
for a layout name and the data types it reads, with the default field names it looks up (a
recipe's ``fields`` overrides any of them); ``draft_row`` picks the reader of
``(recipe.layout, recipe.data_type)``. A new layout is one new module in this package that
registers its reader (DESIGN.md, Preparing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mio.data.fields import MediaRef, as_media, as_text, lookup
from mio.data.inputs import SkipSample
from mio.segments import Box, Text
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, VIDEO

if TYPE_CHECKING:
    from mio.data.formats import InputRow
    from mio.data.recipe import Recipe

Item = Text | Box | MediaRef  # a grounding layout's drafts hold boxes too


@dataclass
class RowDraft:
    """A row turned into segments, media still as references. SFT drafts carry turns."""

    where: str
    items: list[Item]
    turns: list[tuple[str, list[Item]]] | None = None
    task: str | None = None

    def all_items(self) -> list[Item]:
        return [x for _, c in self.turns for x in c] if self.turns is not None else self.items


@dataclass(frozen=True)
class RowFields:
    """One row as a layout reader sees it: its parsed values, the field names to look up (the
    layout's defaults under the recipe's ``fields``), where it is, and where its relative media
    paths resolve."""

    recipe: Recipe
    values: dict[str, Any]
    fields: dict[str, str]
    where: str
    base: Path | None

    def get(self, role: str, required: bool = True) -> Any:
        """The value of the field that plays ``role`` (``text``, ``image``, ``messages`` ...)."""
        return lookup(self.values, self.fields[role], self.where, required)


LayoutReader = Callable[[RowFields], RowDraft]


@dataclass(frozen=True)
class Layout:
    name: str
    data_type: str
    read: LayoutReader
    fields: dict[str, str]  # role -> default field name


LAYOUTS: dict[tuple[str, str], Layout] = {}


def register_layout(name: str, data_type: str, fields: dict[str, str]) -> Callable[[LayoutReader], LayoutReader]:
    """Register the decorated function as the reader of rows of layout ``name`` for recipes of
    ``data_type``, looking up ``fields`` (role -> default field name) unless the recipe names
    others. Stack it to read several data types with one function."""

    def register(read: LayoutReader) -> LayoutReader:
        if (name, data_type) in LAYOUTS:
            raise ValueError(f"layout {name!r} already has a reader for data type {data_type!r}")
        LAYOUTS[(name, data_type)] = Layout(name, data_type, read, dict(fields))
        return read

    return register


def layout_of(name: str, data_type: str, where: str) -> Layout:
    """The reader of layout ``name`` for ``data_type``, or a ValueError that lists the layouts of
    that data type."""
    found = LAYOUTS.get((name, data_type))
    if found is None:
        names = sorted(n for n, dt in LAYOUTS if dt == data_type)
        raise MioUserError(f"{where}: layout {name!r} does not read data type {data_type!r}; set `layout` to one of "
                         f"{', '.join(names)}")
    return found


def draft_row(recipe: Recipe, row: InputRow) -> RowDraft:
    """One row -> its draft, or a SkipSample (bad row, missing field, language filter)."""
    values = row.fields()
    layout = layout_of(recipe.layout, recipe.data_type, f"recipe {recipe.path}")
    fields = {**layout.fields, **recipe.fields}
    where = row.where
    if recipe.filters.languages:
        lang = lookup(values, fields["language"], where, required=False)
        if lang not in recipe.filters.languages:
            raise SkipSample("language", f"{where}: language {lang!r} not in {recipe.filters.languages}")
    return layout.read(RowFields(recipe, values, fields, where, row.base))


def media_refs(draft: RowDraft) -> list[MediaRef]:
    return [x for x in draft.all_items() if isinstance(x, MediaRef)]


# --- pieces several layouts read ----------------------------------------------------------------
def document(where: str, items: list[Item]) -> RowDraft:
    """An interleaved document's draft: each media item is paired with the document's whole text
    (a video tokenizer may choose its key frames by it)."""
    texts = " ".join(x.text for x in items if isinstance(x, Text))
    for x in items:
        if isinstance(x, MediaRef):
            x.text = texts
    return RowDraft(where, items)


def conversation(where: str, turns: list[tuple[str, list[Item]]], task: Any) -> RowDraft:
    """An SFT conversation's draft: (role, items) turns, and the row's task if it names one."""
    return RowDraft(where, [], turns=turns, task=None if task is None else str(task))


def document_media(value: Any, kind: str, base: Path | None, where: str, name: str) -> MediaRef:
    """A document's media item; one that cannot be used is kept with its failure, and the
    recipe's ``filters.bad_media_in_document`` drops either it or the document."""
    try:
        return as_media(value, kind, base, where, name)
    except SkipSample as s:
        return MediaRef(kind, f"{where}: {value!r}", failed=s)


SEGMENT_KEYS = {"image": IMAGE, "speech": SPEECH, "audio": SPEECH, "video": VIDEO}  # a segment's key -> its kind


def segment_item(d: Any, base: Path | None, where: str, document: bool = False) -> Item:
    """One segment object of a row (``{"text": ...}``, ``{"image": PATH}``, ``{"audio": PATH}``, ...)."""
    if not isinstance(d, dict):
        raise SkipSample("bad_field", f"{where}: segment {d!r} is not an object")
    media = document_media if document else as_media
    for key, kind in SEGMENT_KEYS.items():
        if d.get(key) is not None:
            return media(d[key], kind, base, where, key)
    if d.get("text") is not None:
        return Text(as_text(d["text"], where, "text"))
    raise SkipSample("unknown_segment", f"{where}: segment {d} has none of text/image/speech/audio/video")
