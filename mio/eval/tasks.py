"""Eval tasks and the items a prepared dataset gives them.

An eval set is one or more prepared dataset folders (``mio prepare``). SFT samples carry their
task and turns: the turns before the last are the prompt, the last (assistant) turn is the
reference. Pair datasets (image-text, speech-text, video-text) serve the SFT task families of
:data:`mio.templates.PAIR_TASKS` that their direction allows, through the same two-turn
conversation the SFT stage trains on. Samples with the same task and prompt (COCO's five
captions of an image, VQAv2's ten answers to a question) become one item with several
references: the model answers once and is scored against all of them.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mio.data.shards import StoredSample, iter_shard, list_shards
from mio.segments import Box, Segment, Text
from mio.templates import GROUNDING_TASKS, PAIR_TASKS, Turn, grounding_conversations, pair_conversation
from mio.userio import MioUserError

# The kinds of task, by how their answers are scored (every task also gets exact match).
CAPTION, VQA, ASR, TTS, IMAGE_GENERATION = "caption", "vqa", "asr", "tts", "image_generation"
GROUNDING = "grounding"  # the answer's first box against the reference boxes, IoU >= 0.5
TASK_KINDS: dict[str, str] = {
    "image_captioning": CAPTION, "video_understanding": CAPTION, "refexp_generation": CAPTION,
    "refexp": GROUNDING, "phrase_grounding": GROUNDING,
    "image_qa": VQA, "vqa": VQA,
    "asr": ASR, "tts": TTS,
    "image_generation": IMAGE_GENERATION, "descriptive_image_generation": IMAGE_GENERATION,
}
# What an answer may contain, per metric family: the modality scored (and text); other tasks: anything.
OUTPUTS: dict[str, tuple[str, ...]] = {CAPTION: ("text",), VQA: ("text",), ASR: ("text",), TTS: ("text", "speech"),
                                       IMAGE_GENERATION: ("text", "image"), GROUNDING: ("text",)}
# The name each grounding task's figure has in its benchmark's papers.
GROUNDING_FIGURES = {"refexp": "accuracy@0.5", "phrase_grounding": "recall@1"}
# The pair data type each pair task reads.
PAIR_DATA = {"image_captioning": "image_text", "descriptive_image_generation": "image_text", "asr": "speech_text",
             "tts": "speech_text", "video_understanding": "video_text", "video_generation": "video_text"}


def task_kind(task: str) -> str | None:
    """The metric family of a task; None: exact match only."""
    return TASK_KINDS.get(task)


@dataclass
class EvalItem:
    """One prompt to answer and the references its answer is scored against."""

    id: str  # the first sample's key (and its dataset), unique in the eval set
    task: str
    prompt: list[Turn]
    references: list[list[Segment]]  # each reference answer's segments
    condition: str  # the text the answer must say or show (TTS, image generation): the pair's text or the user's
    keys: list[str] = field(default_factory=list)  # every sample this item stands for

    def reference_texts(self) -> list[str]:
        return [answer_text(r) for r in self.references]


def answer_text(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments if isinstance(s, Text)).strip()


def _fingerprint(task: str, turns: Sequence[Turn]) -> tuple[Any, ...]:
    def seg(x: Segment) -> tuple[Any, ...]:
        if isinstance(x, Text):
            return ("text", x.text)
        if isinstance(x, Box):
            return ("box", x.coords, x.phrase)
        arr = np.asarray(getattr(x, "codes", getattr(x, "frames", None)))
        return (type(x).__name__, arr.shape, arr.astype(np.int64).tobytes())

    return (task, tuple((t.role, tuple(seg(x) for x in t.content)) for t in turns))


def _user_text(turns: Sequence[Turn]) -> str:
    users = [t for t in turns if t.role == "user"]
    return answer_text(users[-1].content) if users else ""


@dataclass
class EvalSet:
    items: list[EvalItem]
    skipped: dict[str, int]  # reason -> samples
    available: dict[str, int]  # task -> samples the data has (requested or not)
    missing: list[str]  # requested tasks the data has no sample of


def read_eval_set(folders: Sequence[str | os.PathLike], tasks: Sequence[str], limit: int | None = None) -> EvalSet:
    """The items of ``tasks`` in the prepared datasets ``folders`` (at most ``limit`` per task)."""
    if not tasks:
        raise MioUserError("no eval task given: name some of " + ", ".join(sorted(set(TASK_KINDS) | set(PAIR_TASKS)
                                                                                   | set(GROUNDING_TASKS))))
    if limit is not None and limit < 1:
        raise MioUserError(f"--limit must be positive, got {limit}")
    wanted = set(tasks)
    groups: dict[tuple[Any, ...], EvalItem] = {}
    per_task: collections.Counter[str] = collections.Counter()
    skipped: collections.Counter[str] = collections.Counter()
    available: collections.Counter[str] = collections.Counter()
    for folder in folders:
        for shard in list_shards(folder):
            for sample in iter_shard(shard):
                for task, prompt, reference, condition in _conversations(sample, wanted, skipped, available):
                    key = _fingerprint(task, prompt)
                    item = groups.get(key)
                    if item is None:
                        if limit is not None and per_task[task] >= limit:
                            continue
                        per_task[task] += 1
                        item = groups[key] = EvalItem(f"{Path(folder).name}/{sample.key}/{task}", task, prompt, [],
                                                      condition)
                    item.references.append(reference)
                    item.keys.append(f"{Path(folder).name}/{sample.key}")
    missing = sorted(wanted - set(per_task))
    if not groups:
        have = ", ".join(f"{t} ({n})" for t, n in sorted(available.items())) or "none"
        raise MioUserError(f"no sample of the tasks {sorted(wanted)} in {[str(f) for f in folders]}; tasks the data "
                         f"has: {have}")
    return EvalSet(list(groups.values()), dict(skipped), dict(available), missing)


def _conversations(sample: StoredSample, wanted: set[str], skipped: collections.Counter[str],
                   available: collections.Counter[str]) -> list[tuple[str, list[Turn], list[Segment], str]]:
    """(task, prompt turns, reference answer, condition text) of every wanted task the sample serves."""
    if sample.turns is not None:
        task = sample.task or "chat"
        available[task] += 1
        if task not in wanted:
            return []
        if len(sample.turns) < 2 or sample.turns[-1].role != "assistant":
            skipped[f"{task}: the last turn is not an assistant answer"] += 1
            return []
        prompt = list(sample.turns[:-1])
        return [(task, prompt, list(sample.turns[-1].content), _user_text(prompt))]
    if sample.data_type == "grounding":
        return _grounding_conversations(sample, wanted, available)
    out = []
    for task, data_type in PAIR_DATA.items():
        if data_type != sample.data_type:
            continue
        available[task] += 1
        if task not in wanted:
            continue
        media = [s for s in sample.segments if not isinstance(s, Text)]
        texts = [s.text for s in sample.segments if isinstance(s, Text)]
        if len(media) != 1 or len(texts) != 1:
            skipped[f"{task}: {sample.data_type} sample without exactly one media and one text"] += 1
            continue
        turns = pair_conversation(task, media[0], texts[0])
        out.append((task, turns[:-1], list(turns[-1].content), texts[0]))
    return out


def _grounding_conversations(sample: StoredSample, wanted: set[str],
                             available: collections.Counter[str]) -> list[tuple[str, list[Turn], list[Segment], str]]:
    """A grounding sample's conversations of the wanted grounding tasks (a region serves refexp and
    refexp_generation; a grounded caption serves grounded_captioning and one phrase_grounding item
    per phrase)."""
    out = []
    for task in GROUNDING_TASKS:
        conversations = grounding_conversations(task, sample.segments)
        available[task] += len(conversations)
        if task in wanted:
            out += [(task, turns[:-1], list(turns[-1].content), _user_text(turns[:-1])) for turns in conversations]
    return out
