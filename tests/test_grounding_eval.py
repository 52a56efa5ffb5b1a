"""Grounding templates, eval items and metrics: refexp acc@IoU>=0.5, phrase_grounding recall@1
per phrase, refexp_generation CIDEr, each against values computed by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mio.data.shards import AtomicShardWriter, StoredSample
from mio.eval.metrics import box_iou, top_box_iou
from mio.eval.run import EvalAnswer, score_task
from mio.eval.tasks import read_eval_set
from mio.generate.decoding import DecodeResult
from mio.generate.results import Generation
from mio.segments import Box, Image, Text
from mio.templates import PAPER, grounding_conversations, grounding_pretrain, phrase_groups

IMG = Image(np.arange(32))
CAT, DOG, DOG2 = Box((0.125, 0.125, 0.625, 0.625), "the cat"), Box((0.5, 0.5, 0.9, 0.9), "a dog"), Box((0.0, 0.6, 0.3, 1.0))
REGION = [IMG, CAT]
CAPTION = [IMG, Text("A photo of "), CAT, Text(" and "), DOG, DOG2, Text(".")]


def test_box_iou_by_hand():
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / 0.4375)  # 1/7
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == 0.5  # exactly on the threshold
    assert box_iou((0, 0, 0.2, 0.2), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou((0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)) == pytest.approx(1.0)
    # The top-1 box is the answer's first; any reference box counts.
    answer = [Text("it is "), Box((0, 0, 0.5, 1)), Box((0, 0, 1, 1))]
    assert top_box_iou(answer, [[Box((0.5, 0, 1, 1))], [Box((0, 0, 1, 1))]]) == 0.5
    assert top_box_iou([Text("no box")], [[Box((0, 0, 1, 1))]]) == 0.0


def test_conversations_of_each_form():
    (refexp,) = grounding_conversations("refexp", REGION)
    assert refexp[0].content[0] is IMG and 'Where is "the cat"' in refexp[0].content[1].text
    assert refexp[1].content == [Box(CAT.coords)]  # the answer is the bare box
    (gen,) = grounding_conversations("refexp_generation", REGION)
    assert Box(CAT.coords) in gen[0].content and gen[1].content == [Text("the cat")]
    assert grounding_conversations("grounded_captioning", REGION) == []  # a region is not a caption
    phrases = grounding_conversations("phrase_grounding", CAPTION)
    assert [c[1].content for c in phrases] == [[Box(CAT.coords)], [Box(DOG.coords), Box(DOG2.coords)]]
    assert '"A photo of the cat and a dog."' in phrases[1][0].content[1].text
    assert phrase_groups(CAPTION[1:]) == [("the cat", [CAT]), ("a dog", [DOG, DOG2])]
    (cap,) = grounding_conversations("grounded_captioning", CAPTION)
    assert cap[1].content == CAPTION[1:]
    # Pretraining: a region goes both directions, a caption is written whole.
    directions = {tuple(type(s).__name__ for s in grounding_pretrain(REGION, random.Random(i), PAPER)) for i in range(20)}
    assert directions == {("Image", "Text", "Box"), ("Image", "Text", "Box", "Text")}
    assert grounding_pretrain(CAPTION, random.Random(0), PAPER)[2:] == CAPTION[1:]


def _rows(tmp_path, samples, task):
    with AtomicShardWriter(tmp_path / "000000.tar") as w:
        for s in samples:
            w.write(s)
    items = read_eval_set([tmp_path], [task]).items
    return items


def _answer(item, segments):
    result = DecodeResult(ids=[], modes=[], stopped="stop")
    return EvalAnswer(item, Generation(item.prompt, np.zeros(0), result, segments, None, {}, 0, True))


def test_refexp_accuracy_and_phrase_recall_by_hand(tmp_path):
    samples = [StoredSample("r0", "grounding", REGION), StoredSample("r1", "grounding", [IMG, DOG]),
               StoredSample("c0", "grounding", CAPTION)]
    (tmp_path / "a").mkdir()
    items = _rows(tmp_path / "a", samples, "refexp")
    assert [i.task for i in items] == ["refexp", "refexp"]
    # r0: IoU(cat, its top half) = 0.125 / 0.25 = 0.5 -> right (binary fractions: exact); r1: no box -> wrong.
    rows = [_answer(items[0], [Box((0.125, 0.125, 0.625, 0.375))]), _answer(items[1], [Text("a dog")])]
    figures, _ = score_task("refexp", rows, None, None, tmp_path)
    assert figures["accuracy@0.5"] == 0.5 and figures["mean_iou"] == pytest.approx(0.25)

    (tmp_path / "b").mkdir()
    items = _rows(tmp_path / "b", samples, "phrase_grounding")
    assert len(items) == 2  # one per phrase of the caption
    # "the cat": IoU 0.325^2 / (0.16 + 0.25 - 0.325^2) = 0.347 -> miss; "a dog": its second box
    # DOG2 matched exactly -> hit. Recall@1 = 1/2.
    rows = [_answer(items[0], [Box((0.3, 0.3, 0.7, 0.7))]), _answer(items[1], [Box(DOG2.coords)])]
    assert box_iou((0.3, 0.3, 0.7, 0.7), CAT.coords) == pytest.approx(0.325**2 / (0.16 + 0.25 - 0.325**2))
    figures, _ = score_task("phrase_grounding", rows, None, None, tmp_path)
    assert figures["recall@1"] == 0.5


def test_refexp_generation_is_scored_by_cider(tmp_path):
    from mio.eval.metrics import caption_scores

    samples = [StoredSample("r0", "grounding", REGION), StoredSample("r1", "grounding", [IMG, DOG])]
    items = _rows(tmp_path, samples, "refexp_generation")
    rows = [_answer(items[0], [Text("the cat")]), _answer(items[1], [Text("a cat")])]
    figures, _ = score_task("refexp_generation", rows, None, None, tmp_path)
    corpus, _ = caption_scores([["the cat"], ["a dog"]], ["the cat", "a cat"])  # the existing scorer, tested by hand
    assert figures["cider"] == pytest.approx(corpus["cider"]) and figures["exact"] == 0.5


def test_training_draws_a_task_the_sample_serves():
    from mio.data.reading import DatasetSpec, training_segments

    spec = DatasetSpec("g", format="sft", tasks=["refexp", "grounded_captioning"])
    for seed in range(5):  # a region only serves refexp of the two; a caption only grounded_captioning
        segs, _ = training_segments(StoredSample("r0", "grounding", REGION), spec, random.Random(seed))
        boxes = [s for s in segs if isinstance(s, Box)]
        assert boxes == [Box(CAT.coords)] and boxes[0].loss  # the answer, supervised
        segs, _ = training_segments(StoredSample("c0", "grounding", CAPTION), spec, random.Random(seed))
        assert [s for s in segs if isinstance(s, Box)] == [CAT, DOG, DOG2]
    with pytest.raises(ValueError, match="serves none of the tasks"):
        training_segments(StoredSample("c0", "grounding", CAPTION), DatasetSpec("g", format="sft", tasks=["refexp"]),
                          random.Random(0))
    with pytest.raises(ValueError, match="unknown tasks"):
        DatasetSpec("g", format="sft", tasks=["where_is_waldo"])
    segs, _ = training_segments(StoredSample("r0", "grounding", REGION), DatasetSpec("g"), random.Random(0))
    assert segs[0] == IMG and Box(CAT.coords) in segs  # pretraining: a template, either direction
