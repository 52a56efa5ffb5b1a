"""A layout is one registered reader: registering one makes `mio prepare` read it, a recipe naming a
layout that cannot read its data type is refused with the ones that can, and a layout/data type pair
has one reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mio.data.fields import as_text
from mio.data.layouts import LAYOUTS, RowDraft, RowFields, register_layout
from mio.data.layouts.registry import conversation
from mio.data.prepare import prepare
from mio.data.recipe import Recipe
from mio.data.shards import iter_shard, list_shards
from mio.segments import Text
from mio.userio import MioUserError


@pytest.fixture
def qa_layout():
    """A toy layout, as a grounding reader would be added: rows {"q": ..., "a": ...} as one exchange."""

    @register_layout("qa", "sft", {"question": "q", "answer": "a"})
    def qa(row: RowFields) -> RowDraft:
        turns = [("user", [Text(as_text(row.get("question"), row.where, "question"))]),
                 ("assistant", [Text(as_text(row.get("answer"), row.where, "answer"))])]
        return conversation(row.where, turns, None)

    yield qa
    del LAYOUTS[("qa", "sft")]


def _recipe(tmp_path: Path, rows: list[dict], **keys) -> Path:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data_type": "sft", "input": "rows.jsonl", **keys}))
    return path


def test_a_registered_layout_is_read_by_prepare(tmp_path, qa_layout):
    rows = [{"q": "What is 2 + 2?", "a": "4"}, {"q": "Capital of France?", "a": "Paris"}, {"q": "no answer"}]
    m = prepare(_recipe(tmp_path, rows, layout="qa"), tmp_path / "out")
    assert (m["seen"], m["samples"], m["skipped"]) == (3, 2, {"missing_field": 1})
    stored = [s for shard in list_shards(tmp_path / "out") for s in iter_shard(shard)]
    assert [[(t.role, t.content) for t in s.turns] for s in stored] == [
        [("user", [Text(r["q"])]), ("assistant", [Text(r["a"])])] for r in rows[:2]]


def test_a_layout_that_cannot_read_the_data_type_is_refused_with_those_that_can(tmp_path):
    with pytest.raises(MioUserError, match=r"layout 'obelics' does not read data type 'sft'; set `layout` to one "
                                           r"of llava, segments"):
        Recipe.load(_recipe(tmp_path, [], layout="obelics"))


def test_a_layout_and_data_type_have_one_reader(qa_layout):
    with pytest.raises(ValueError, match="already has a reader"):
        register_layout("qa", "sft", {})(qa_layout)
