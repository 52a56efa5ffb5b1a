"""`mio eval`'s metrics against values worked out by hand on small known inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import tiny_clip_folder

from mio.eval.metrics import (
    ClipScorer,
    caption_scores,
    exact_match,
    normalize_transcript,
    normalize_vqa_answer,
    ptb_tokenize,
    vqa_accuracy,
    word_error_rates,
)
from mio.segments import Image, Text


def test_ptb_tokenize_splits_clitics_and_drops_punctuation():
    assert ptb_tokenize("The cat's toy, (a ball).") == "the cat 's toy a ball"
    assert ptb_tokenize("Don't stop!\nA well-known 3.5 m pole...") == "do n't stop a well-known 3.5 m pole"


def test_cider_by_hand():
    # Two images, one reference each. Unigram document frequencies over the references:
    # "a" in both (idf log(2/2) = 0), "cat" and "dog" in one (idf log 2). Image 1's answer equals
    # its reference: cosine 1 for 1- and 2-grams, no 3-/4-grams (0) -> 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 2's "a cat" against "a dog": the only weighted n-grams differ -> 0. Corpus: 2.5.
    corpus, each = caption_scores([["a cat"], ["a dog"]], ["a cat", "a cat"])
    assert corpus["cider"] == pytest.approx(2.5)
    assert [e["cider"] for e in each] == pytest.approx([5.0, 0.0])


def test_bleu4_by_hand():
    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty: (0.2) ** (1/4).
    corpus, each = caption_scores([["a b c d f", "x y"]], ["A b c d, e."])
    assert corpus["bleu4"] == pytest.approx(0.2 ** 0.25, rel=1e-6)
    assert each[0]["bleu4"] == pytest.approx(0.2 ** 0.25, rel=1e-6)
    # brevity: a 4-word answer to a 5-word reference, all n-grams right: exp(1 - 5/4).
    corpus, _ = caption_scores([["a b c d e"]], ["a b c d"])
    assert corpus["bleu4"] == pytest.approx(math.exp(1 - 5 / 4), rel=1e-6)


def test_vqa_normalization_and_accuracy_by_hand():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("The  answer is: dont") == "answer is don't"
    assert normalize_vqa_answer("1,000") == "1000"
    # 3 of 10 humans said yes: leaving out one of them -> 2/3 (3 times), another -> 1 (7 times).
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("Yes.", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("no", answers) == 1.0
    assert vqa_accuracy("maybe", answers) == 0.0
    # 1 of 10: leaving it out -> 0, otherwise 1/3 (9 times) -> 0.3.
    assert vqa_accuracy("two", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("A cat", ["cat"]) == 1.0  # one reference: normalized exact match


def test_wer_by_hand_with_whisper_normalization():
    # "Mr. Smith has twenty apples" -> "mister smith has 20 apples"; the answer drops one word and
    # changes one: 2 edits / 5 words. Second pair: 1 insertion / 2 words. Corpus: 3 / 7.
    corpus, each = word_error_rates(["Mr. Smith has twenty apples", "hello world"],
                                    ["mister smith had 20", "Hello, world again!"])
    assert normalize_transcript("Mr. Smith has twenty apples") == "mister smith has 20 apples"
    assert each == pytest.approx([2 / 5, 1 / 2])
    assert corpus == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="sample 1: reference '\\[noise\\] uh' is empty"):
        word_error_rates(["a", "[noise] uh"], ["a", "b"])  # Whisper drops fillers and bracketed events


def test_exact_match_is_strict():
    img = Image(np.arange(32))
    assert exact_match([Text(" a cat ")], [Text("a cat")])
    assert not exact_match([Text("a cat.")], [Text("a cat")])
    assert exact_match([img], [Image(np.arange(32))])
    assert not exact_match([Image(np.arange(1, 33))], [img])
    assert not exact_match([img, Text("x")], [img])


# --- CLIP score ------------------------------------------------------------------------------
def test_clip_score_by_hand(tmp_path):
    """A random CLIP, and its twin whose cosines are all negated: both checked against cosines
    computed from each tower by hand, so both sides of max(cos, 0) are."""
    plain = check_clip_by_hand(tiny_clip_folder(tmp_path / "clip", flip=False))
    flipped = check_clip_by_hand(tiny_clip_folder(tmp_path / "clip_flipped", flip=True))
    assert min(plain) > 0 > max(flipped)
    with pytest.raises(FileNotFoundError, match="--clip-model .*no config.json"):
        ClipScorer(tmp_path / "nowhere")


def check_clip_by_hand(folder: Path) -> list[float]:
    from PIL import Image as PILImage
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a cat", "a red rocket", "coffee"]
    scores = ClipScorer(folder)(images, texts)
    # By hand: each tower's projected embedding, cosine, 100 * max(cos, 0).
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    cosines = []
    with torch.no_grad():
        for image, text, score in zip(images, texts, scores):
            e_i = model.visual_projection(model.vision_model(**proc(images=image, return_tensors="pt")).pooler_output)[0]
            t = proc(text=text, return_tensors="pt")
            e_t = model.text_projection(model.text_model(**t).pooler_output)[0]
            cosines.append(float(e_i @ e_t / (e_i.norm() * e_t.norm())))
            assert score == pytest.approx(100 * max(cosines[-1], 0.0), abs=1e-4)
    return cosines
