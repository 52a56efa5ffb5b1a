"""The paper's benchmark metrics, each from the library its benchmark is scored with.

- captioning: CIDEr(-D) and BLEU-4 from pycocoevalcap (the COCO caption scorers). Their PTB
  tokenizer runs Stanford CoreNLP under Java; :func:`ptb_tokenize` does the same job in Python
  (lower case, PTB splitting of clitics and punctuation, punctuation tokens dropped as
  pycocoevalcap drops them), so figures can differ from Java-tokenized ones on unusual text;
- VQA: VQAv2 accuracy with the answer normalization of the official evaluation (punctuation,
  number words, articles, contractions) and its ten-answer leave-one-out average;
- ASR (and TTS through an ASR model): word error rate from jiwer over texts normalized by
  Whisper's English normalizer (the ``whisper-normalizer`` package: OpenAI's code as a library);
- image generation: CLIP score, 100 * max(cos(image, text), 0), with a local CLIP folder;
- exact match of the generated segments, as the demo has always scored its memorised pairs;
- grounding: a predicted box is right when its IoU with a reference box is at least 0.5 (the
  RefCOCO/+/g accuracy of referring expression comprehension, and Flickr30k Entities' recall@1
  per phrase under the "any box" protocol Kosmos-2 reports: any of the phrase's boxes counts).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mio.segments import Box, Segment, Text
from mio.userio import MioUserError


# --- exact match -----------------------------------------------------------------------------
def exact_match(output: Sequence[Segment], target: Sequence[Segment]) -> bool:
    """The generated answer equals the target: same segments in order, texts compared stripped
    of outer spaces, media codes exactly."""
    if len(output) != len(target):
        return False
    for o, t in zip(output, target):
        if isinstance(t, Text):
            if not isinstance(o, Text) or o.text.strip() != t.text.strip():
                return False
        elif not o == t:
            return False
    return True


# --- grounding: IoU of boxes -------------------------------------------------------------------
IOU_THRESHOLD = 0.5


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when both are empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def top_box_iou(answer: Sequence[Segment], references: Sequence[Sequence[Segment]]) -> float:
    """The IoU of the answer's first box (its top-1 prediction) with the closest box of any
    reference; 0 when the answer holds no box."""
    predicted = next((s for s in answer if isinstance(s, Box)), None)
    boxes = [s for ref in references for s in ref if isinstance(s, Box)]
    if predicted is None or not boxes:
        return 0.0
    return max(box_iou(predicted.coords, b.coords) for b in boxes)


# --- captioning: CIDEr and BLEU-4 ------------------------------------------------------------
# Punctuation tokens pycocoevalcap removes after PTB tokenization (PTB writes brackets as
# -LRB- etc. and quotes as `` and '', all in its list; here they are dropped directly).
_PTB_DROP = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"',
                       "(", ")", "[", "]", "{", "}"])
_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ll|'m|'ve|'d)\b")
_PTB_TOKEN = re.compile(r"n't|'\w+|\d+(?:[.,:]\d+)+|\w+(?:[-/'&]\w+)*|\.\.\.|--|\S")


def ptb_tokenize(text: str) -> str:
    """PTB tokenization as pycocoevalcap uses it (CoreNLP with -lowerCase, punctuation removed),
    in Python: ``"The cat's toy, (a ball)."`` -> ``"the cat 's toy a ball"``."""
    text = _CLITIC.sub(r"\1 \2", text.lower().replace("\n", " "))
    return " ".join(t for t in _PTB_TOKEN.findall(text) if t not in _PTB_DROP)


def caption_scores(references: Sequence[Sequence[str]],
                   hypotheses: Sequence[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus CIDEr-D and BLEU-4 of ``hypotheses[i]`` against ``references[i]`` (one or more
    each), and the per-sample scores. CIDEr's document frequencies come from the references of
    this corpus, as in the COCO evaluation: score a whole eval set at once."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(f"caption scores need one hypothesis per reference set, got {len(hypotheses)} "
                         f"hypotheses and {len(references)} reference sets")
    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [ptb_tokenize(h)] for i, h in enumerate(hypotheses)}
    for i, refs in gts.items():
        if not refs:
            raise ValueError(f"caption sample {i} has no reference")
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    each = [{"cider": float(c), "bleu4": float(b)} for c, b in zip(cider_each, bleu_each[3])]
    return {"cider": float(cider), "bleu4": float(bleu[3])}, each


# --- VQA -------------------------------------------------------------------------------------
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings the VQA evaluation restores (its contraction table, regular part).
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've").split()}
_VQA_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point


def normalize_vqa_answer(answer: str) -> str:
    """VQAv2's answer normalization: punctuation removed (glued punctuation becomes a space
    unless it sits beside a space or between digits), lower case, number words -> digits,
    articles dropped, apostrophe-less contractions restored. ``"Two dogs."`` -> ``"2 dogs"``."""
    raw = answer.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA_DIGIT.search(raw) is not None
    text = raw
    for p in _VQA_PUNCT:
        spaced = (p + " " in raw) or (" " + p in raw) or glued
        text = text.replace(p, "" if spaced else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction: min(1, matching human answers / 3), averaged over the
    subsets that leave out each human answer in turn. A question with a single reference answer
    (not VQAv2's ten) is scored by normalized exact match, where the formula would give 0."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # Leaving out a matching answer leaves matches - 1 others; leaving out another leaves matches.
    accs = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return float(np.mean(accs))


# --- WER -------------------------------------------------------------------------------------
@functools.cache
def _whisper_normalizer() -> Any:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_transcript(text: str) -> str:
    """Whisper's English text normalizer (spelling, numbers, punctuation, case)."""
    return _whisper_normalizer()(text)


def word_error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, list[float]]:
    """Corpus WER (all edits / all reference words, jiwer) over Whisper-normalized texts, and
    each sample's WER. A reference that normalizes to nothing cannot be scored: it is an error
    naming the sample (the caller skips and counts such samples before)."""
    import jiwer

    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    for i, (raw, ref) in enumerate(zip(references, refs)):
        if not ref.strip():
            raise ValueError(f"sample {i}: reference {raw!r} is empty after Whisper normalization; WER is undefined")
    if not refs:
        raise ValueError("WER needs at least one sample")
    corpus = jiwer.process_words(refs, hyps)
    each = [float(jiwer.wer(r, h)) for r, h in zip(refs, hyps)]
    return float(corpus.wer), each


# --- models behind metrics: an ASR pipeline and CLIP ---------------------------------------------
def local_folder(path: str | os.PathLike, flag: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {folder}: not a local transformers model folder (no config.json); "
                                "nothing is downloaded, so give a folder saved with save_pretrained")
    return folder


class Transcriber:
    """Speech -> text with any local transformers ``automatic-speech-recognition`` folder
    (Whisper, wav2vec 2.0 CTC, ...), through transformers' own pipeline."""

    def __init__(self, folder: str | os.PathLike, device: str | None = None) -> None:
        from transformers import pipeline

        self.folder = local_folder(folder, "--asr-model")
        self.pipe = pipeline("automatic-speech-recognition", model=str(self.folder), device=device)

    def __call__(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        """Waveforms (T,) float32 at ``sample_rate`` -> transcripts (resampled by the pipeline)."""
        return [str(self.pipe({"raw": np.asarray(w, dtype=np.float32), "sampling_rate": sample_rate})["text"])
                for w in waves]


class ClipScorer:
    """CLIP score of images against texts: 100 * max(cos(E_image, E_text), 0), with any local
    folder whose model returns ``image_embeds`` and ``text_embeds`` (CLIP, SigLIP)."""

    def __init__(self, folder: str | os.PathLike, device: str | None = None) -> None:
        from transformers import AutoModel, AutoProcessor

        self.folder = local_folder(folder, "--clip-model")
        self.device = torch.device(device or "cpu")
        self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """PIL images and their texts (pairwise) -> one score each."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score pairs images with texts: got {len(images)} images, {len(texts)} texts")
        if not texts:
            return []
        inputs = self.processor(text=list(texts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        out = self.model(**inputs)
        if getattr(out, "image_embeds", None) is None or getattr(out, "text_embeds", None) is None:
            raise MioUserError(f"--clip-model {self.folder}: its model returns no image_embeds/text_embeds; "
                             "give a CLIP-style dual encoder")
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (N, D)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (N, D)
        return (100 * (image * text).sum(-1).clamp(min=0)).tolist()
