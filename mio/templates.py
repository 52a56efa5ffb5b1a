"""Pretraining prompt templates (MIO paper, Appendix C) and ChatML SFT rendering.

Templates turn a sample's segments into the segments the model trains on. Directions are
drawn with the caller's random generator, so the data pipeline re-draws them every epoch.

Two template sets (:data:`TEMPLATE_SETS`), chosen by a stage (``data.templates``): ``paper``
(the paper's wording, Appendix C) and ``mio-release`` (MIO's released code: captions quoted
LaTeX-style, ``...'' , and its SFT instructions for TTS, image and video generation), so that
continued training from MIO's weights sees the prompts MIO was trained with.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mio.segments import Box, Image, Segment, Speech, Text, Video
from mio.userio import MioUserError
from mio.vocab import CHAT_END, CHAT_START

# --- pretraining -------------------------------------------------------------------------
PRETRAIN_TEMPLATES: dict[str, str] = {
    "image_caption": "{image} The caption of this image is: {text}",
    "image_generation": 'Please generate an image of "{text}": {image}',
    "video_caption": "Please describe the following video: {video} {text}",
    "video_generation": 'Please generate a video for "{text}": {video}',
    "asr": "{speech} Transcribe this speech: {text}",
    "asr_stage3": "{speech} The transcription of this speech is: {text}",
    "tts": 'Please generate a speech of "{text}": {speech}',
}

DATA_TYPES = ("image_text", "text", "interleaved", "video_text", "video_interleaved", "speech_text", "grounding", "sft")

# Probability of the generation direction (text -> media) per pair type (paper, Sec. 3).
GENERATION_PROB = {"image_text": 0.5, "video_text": 0.6, "speech_text": 0.5}

_PLACEHOLDER = re.compile(r"\{(image|video|speech|media|text)\}")


def fill_template(template: str, text: str, media: Segment) -> list[Segment]:
    """Split a template at its placeholders and put the text and the media segment in
    (``{image}``, ``{video}``, ``{speech}`` and ``{media}`` all stand for the media segment)."""
    out: list[Segment] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            out.append(Text(template[pos:m.start()]))
        out.append(Text(text) if m.group(1) == "text" else media)
        pos = m.end()
    if pos < len(template):
        out.append(Text(template[pos:]))
    return out


def content_only(seg: Segment) -> Segment:
    """Speech as input keeps only its content layer (layer 0)."""
    if isinstance(seg, Speech):
        return Speech(np.asarray(seg.codes)[:1], loss=seg.loss)
    return seg


# --- condition dropout: classifier-free guidance's training side ----------------------------
# The generation task families whose condition (caption, transcript, description) a stage may
# drop, and the pretraining templates and SFT pair tasks of each.
CONDITION_FAMILIES: dict[str, tuple[str, ...]] = {
    "image_generation": ("image_generation", "descriptive_image_generation"),
    "tts": ("tts",),
    "video_generation": ("video_generation",),
}
_FAMILY_OF = {name: family for family, names in CONDITION_FAMILIES.items() for name in names}


def condition_draw(key: str, epoch: int, seed: int) -> float:
    """A uniform number in [0, 1) that depends on (sample key, epoch, run seed) alone: the same on
    every reader, rank and world size, and when a run resumes."""
    digest = hashlib.sha256(f"cond:{seed}:{epoch}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


@dataclass(frozen=True)
class ConditionDropout:
    """A stage's condition dropout: per task family (:data:`CONDITION_FAMILIES`) the probability that
    a generation sample's condition is replaced by ``null_text`` (empty: the template with its
    condition left empty). The media it asks for, the sample's target, is unchanged."""

    p: Mapping[str, float] = field(default_factory=dict)
    null_text: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.p) - set(CONDITION_FAMILIES))
        if unknown:
            raise MioUserError(f"data.cond_dropout: unknown task family {unknown}; expected some of "
                             f"{sorted(CONDITION_FAMILIES)}")
        bad = {k: v for k, v in self.p.items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise MioUserError(f"data.cond_dropout: probabilities must be in [0, 1], got {bad}")

    @property
    def active(self) -> bool:
        return any(float(v) > 0 for v in self.p.values())


@dataclass
class ConditionDraw:
    """One sample's condition dropout: drawn from (its key, the epoch, the run's seed) when a template
    or pair task of a family with p > 0 asks for its condition; ``outcome`` records it (None: the
    sample had no condition to drop)."""

    dropout: ConditionDropout
    key: str
    epoch: int
    seed: int
    outcome: bool | None = None

    def condition(self, name: str, text: str) -> str:
        """The condition template or pair task ``name`` puts in: ``text``, or the null text."""
        p = float(self.dropout.p.get(_FAMILY_OF.get(name, ""), 0.0))
        if p <= 0.0:
            return text
        self.outcome = condition_draw(self.key, self.epoch, self.seed) < p
        return self.dropout.null_text if self.outcome else text


def pretrain_segments(data_type: str, segments: Sequence[Segment], rng: random.Random,
                      asr_template: str = "asr", templates: TemplateSet | None = None,
                      draw: ConditionDraw | None = None) -> list[Segment]:
    """A stored sample's segments -> the segments one pretraining step sees.

    Pairs (media, text) get a template and a random direction; documents pass as they are,
    with any speech in them as content codes. ``draw``: the sample's condition dropout.
    """
    if data_type in ("image_text", "video_text", "speech_text"):
        media, text = _pair(data_type, segments)
        generate = rng.random() < GENERATION_PROB[data_type]
        if data_type == "image_text":
            name = "image_generation" if generate else "image_caption"
        elif data_type == "video_text":
            name = "video_generation" if generate else "video_caption"
        else:
            name = "tts" if generate else asr_template
            media = media if generate else content_only(media)
        if draw is not None:
            text = draw.condition(name, text)
        return fill_template((templates or PAPER).pretrain[name], text, media)
    if data_type in ("text", "interleaved", "video_interleaved"):
        return [content_only(s) for s in segments]
    if data_type == "grounding":
        return grounding_pretrain(segments, rng, templates or PAPER)
    raise MioUserError(f"unknown pretraining data type {data_type!r}; expected one of {DATA_TYPES[:-1]}")


def _pair(data_type: str, segments: Sequence[Segment]) -> tuple[Segment, str]:
    want = {"image_text": (Image,), "video_text": (Video, Image), "speech_text": (Speech,)}[data_type]
    media = [s for s in segments if isinstance(s, want)]
    texts = [s.text for s in segments if isinstance(s, Text)]
    if len(media) != 1 or len(texts) != 1:
        raise MioUserError(f"a {data_type} sample needs one media segment and one text, got "
                         f"{[type(s).__name__ for s in segments]}")
    return media[0], texts[0]


# --- SFT (ChatML) --------------------------------------------------------------------------
SYSTEM_STANDARD = ("You are MIO, an AI assistant capable of understanding and generating images, text, "
                   "videos, and speech, selecting the appropriate modality according to the context.")
SYSTEM_SPEECH = ("You are MIO, an AI assistant capable of understanding images, text, videos, and speech, "
                 "and generating speech. Please respond to the user with speech only, starting with <spch> "
                 "and ending with </spch>.")
SPEECH_ONLY_TASKS = frozenset({"tts", "speech_generation"})
ROLES = ("system", "user", "assistant")


def system_prompt(task: str | None) -> str:
    """MIO's speech-only prompt for speech generation and TTS, the standard one otherwise."""
    return SYSTEM_SPEECH if task in SPEECH_ONLY_TASKS else SYSTEM_STANDARD


@dataclass
class Turn:
    role: str
    content: list[Segment]


class ConversationError(MioUserError):
    """A conversation that cannot be rendered (unknown role, order, empty content...)."""


def check_conversation(turns: Sequence[Turn], for_training: bool = True) -> None:
    if not turns:
        raise ConversationError("conversation has no turns")
    for t in turns:
        if t.role not in ROLES:
            raise ConversationError(f"unknown role {t.role!r}; expected one of {ROLES}")
    body = [t for t in turns if t.role != "system"]
    if any(t.role == "system" for t in turns[1:]):
        raise ConversationError("a system turn may only come first")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise ConversationError(f"turn {i} is {t.role!r}, expected {want!r} (user and assistant alternate, user first)")
        if not t.content or all(isinstance(s, Text) and not s.text.strip() for s in t.content):
            raise ConversationError(f"turn {i} ({t.role}) has empty content")
    if for_training and not any(t.role == "assistant" for t in body):
        raise ConversationError("conversation has no assistant turn to supervise")


def render_chat(turns: Sequence[Turn], task: str | None = None, add_generation_prompt: bool = False) -> list[Segment]:
    """ChatML with MIO's system prompts; only assistant content and its <|im_end|> are supervised.

    User speech is input (content codes only); assistant speech is output (all layers).
    """
    check_conversation(turns, for_training=not add_generation_prompt)
    return _chatml(turns, task, add_generation_prompt)


def unconditional_chat(turns: Sequence[Turn], task: str | None, content: Sequence[Segment]) -> list[Segment]:
    """The unconditional branch of classifier-free guidance: the conversation with its condition
    removed -- its system prompt (its own, or MIO's for ``task``), one user turn holding only
    ``content`` (empty, or a negative prompt) and the generation prompt."""
    system = [turns[0]] if turns and turns[0].role == "system" else []
    return _chatml([*system, Turn("user", list(content))], task, add_generation_prompt=True)


def _chatml(turns: Sequence[Turn], task: str | None, add_generation_prompt: bool) -> list[Segment]:
    system = turns[0].content if turns[0].role == "system" else [Text(system_prompt(task))]
    out: list[Segment] = [Text(f"{CHAT_START}system\n", loss=False)]
    out += [_with_loss(s, False) for s in system]
    out.append(Text(CHAT_END, loss=False))
    for t in turns:
        if t.role == "system":
            continue
        out.append(Text(f"\n{CHAT_START}{t.role}\n", loss=False))
        if t.role == "user":
            out += [_with_loss(content_only(s), False) for s in t.content]
            out.append(Text(CHAT_END, loss=False))
        else:
            out += [_with_loss(s, True) for s in t.content]
            out.append(Text(CHAT_END, loss=True))
    if add_generation_prompt:
        out.append(Text(f"\n{CHAT_START}assistant\n", loss=False))
    return out


def _with_loss(seg: Segment, loss: bool) -> Segment:
    if isinstance(seg, Text):
        return Text(seg.text, loss=loss)
    if isinstance(seg, Image):
        return Image(seg.codes, loss=loss)
    if isinstance(seg, Video):
        return Video(seg.frames, loss=loss)
    if isinstance(seg, Box):
        return Box(seg.coords, seg.phrase, loss=loss)
    return Speech(seg.codes, loss=loss)


# The user turns that make a (media, text) pair a conversation of an SFT task family: with
# ``{media}`` the media is the question and the text the answer; with ``{text}`` the text asks
# for the media. The captioning and ASR wording is MIO's own (its infer.py).
PAIR_TASKS: dict[str, str] = {
    "image_captioning": "Please provide an accurate and detailed description of this image.\n{media}",
    "descriptive_image_generation": "Please generate an image of the following description.\n{text}",
    "asr": "Please transcribe this speech.\n{media}",
    "tts": "Please read the following text aloud.\n{text}",
    "video_understanding": "Please describe the following video.\n{media}",
    "video_generation": "Please generate a video for the following description.\n{text}",
}


# --- grounding --------------------------------------------------------------------------------
# A stored grounding sample is an image and then either *regions*, boxes each with its referring
# expression or region description as its phrase and no other text (RefCOCO/+/g: a ref's
# sentences, one box each; Visual Genome: an image's regions), or a *grounded caption*, texts and
# phrase-linked boxes (GrIT, Flickr30k Entities). A phrase grounded by several boxes is its Box
# with the phrase followed by the others without one.
GROUNDING_PRETRAIN: dict[str, str] = {
    "refexp": '{image} The region of "{text}" is {box}',  # comprehension: text -> box
    "refexp_generation": "{image} The region {box} shows: {text}",  # generation: box -> text
    "grounded_captioning": "{image} The grounded caption of this image is: {caption}",
}
# SFT task families: the user turn of each (``{media}`` the image, ``{box}`` a box given as input).
GROUNDING_TASKS: dict[str, str] = {
    "refexp": '{media}\nWhere is "{text}" in this image? Answer with its box.',
    "refexp_generation": "{media}\nWhat is in the region {box}? Describe it in a few words.",
    "grounded_captioning": "{media}\nDescribe this image, linking each phrase to its box.",
    "phrase_grounding": '{media}\nIn the sentence "{caption}", where is "{text}"? Answer with its box.',
}
# Which tasks each form serves: regions refexp and refexp_generation, captions the other two.
CAPTION_TASKS = ("grounded_captioning", "phrase_grounding")


def grounding_parts(segments: Sequence[Segment]) -> tuple[Image, list[Segment]]:
    """A stored grounding sample -> (its image, the rest: one phrase box, or a grounded caption)."""
    if not segments or not isinstance(segments[0], Image) or not any(isinstance(s, Box) for s in segments[1:]):
        raise ValueError(f"a grounding sample is an image, then boxes (with texts), got "
                         f"{[type(s).__name__ for s in segments]}")
    return segments[0], list(segments[1:])


def is_region(rest: Sequence[Segment]) -> bool:
    """Regions (boxes each with its phrase, no text), not a grounded caption."""
    return all(isinstance(s, Box) and bool(s.phrase) for s in rest)


def caption_text(rest: Sequence[Segment]) -> str:
    """A grounded caption's plain text: its texts and phrases, without boxes."""
    return "".join(s.text if isinstance(s, Text) else (s.phrase or "") for s in rest)


def phrase_groups(rest: Sequence[Segment]) -> list[tuple[str, list[Box]]]:
    """A grounded caption's phrases, each with its boxes (the box with the phrase and those right after it)."""
    groups: list[tuple[str, list[Box]]] = []
    for s in rest:
        if isinstance(s, Box):
            if s.phrase is not None:
                groups.append((s.phrase, [s]))
            elif groups:
                groups[-1][1].append(s)
    return groups


def _bare(box: Box) -> Box:
    return Box(box.coords)


def grounding_pretrain(segments: Sequence[Segment], rng: random.Random, templates: TemplateSet) -> list[Segment]:
    """One of the regions, drawn at random, either direction at random (comprehension or
    generation); a grounded caption is written whole after its image."""
    image, rest = grounding_parts(segments)
    if is_region(rest):
        box = rest[rng.randrange(len(rest))]
        name = "refexp" if rng.random() < 0.5 else "refexp_generation"
        return _fill(templates.grounding_pretrain[name], image, box.phrase or "", _bare(box), [])
    return _fill(templates.grounding_pretrain["grounded_captioning"], image, "", None, rest)


def _fill(template: str, image: Segment, text: str, box: Box | None, caption: Sequence[Segment],
          sentence: str = "") -> list[Segment]:
    """Split a grounding template at its placeholders: ``{image}``/``{media}``, ``{box}``,
    ``{caption}`` (segments), ``{text}`` and ``{caption_text}`` (strings)."""
    out: list[Segment] = []
    for piece in re.split(r"(\{(?:image|media|box|caption|text|caption_text)\})", template):
        if piece in ("{image}", "{media}"):
            out.append(image)
        elif piece == "{box}":
            out.append(box)  # type: ignore[arg-type]
        elif piece == "{caption}":
            out += list(caption)
        elif piece:
            piece = {"{text}": text, "{caption_text}": sentence}.get(piece, piece)
            if out and isinstance(out[-1], Text):  # one text between two non-texts
                out[-1] = Text(out[-1].text + piece)
            else:
                out.append(Text(piece))
    return out


def grounding_conversations(task: str, segments: Sequence[Segment],
                            templates: TemplateSet | None = None) -> list[list[Turn]]:
    """Every two-turn conversation of an SFT grounding task a stored sample serves (none when its
    form does not serve the task): one per region, and for ``phrase_grounding`` one per phrase of
    a grounded caption (whose answer is all the phrase's boxes)."""
    wording = (templates or PAPER).grounding_tasks
    if task not in wording:
        raise ValueError(f"unknown grounding task {task!r}; expected one of {sorted(wording)}")
    image, rest = grounding_parts(segments)
    region = is_region(rest)
    if task == "refexp" and region:
        return [[Turn("user", _fill(wording[task], image, b.phrase or "", None, [])), Turn("assistant", [_bare(b)])]
                for b in rest]
    if task == "refexp_generation" and region:
        return [[Turn("user", _fill(wording[task], image, "", _bare(b), [])), Turn("assistant", [Text(b.phrase or "")])]
                for b in rest]
    if task in CAPTION_TASKS and not region:
        if task == "grounded_captioning":
            return [[Turn("user", _fill(wording[task], image, "", None, [])), Turn("assistant", list(rest))]]
        sentence = caption_text(rest)
        return [[Turn("user", _fill(wording[task].replace("{caption}", "{caption_text}"), image, phrase, None, [],
                                    sentence)),
                 Turn("assistant", [_bare(b) for b in boxes])] for phrase, boxes in phrase_groups(rest)]
    return []


@dataclass(frozen=True)
class TemplateSet:
    """The wording a stage trains with: pretraining templates and the SFT pair tasks' user turns
    (and the grounding tasks')."""

    name: str
    pretrain: Mapping[str, str]
    pair_tasks: Mapping[str, str]
    grounding_pretrain: Mapping[str, str] = field(default_factory=lambda: GROUNDING_PRETRAIN)
    grounding_tasks: Mapping[str, str] = field(default_factory=lambda: GROUNDING_TASKS)


PAPER = TemplateSet("paper", PRETRAIN_TEMPLATES, PAIR_TASKS)
# MIO's released infer.py: generation prompts quote the caption ``...'' (Base), and its
# Instruct prompts for image generation, TTS and video generation.
MIO_RELEASE = TemplateSet(
    "mio-release",
    {**PRETRAIN_TEMPLATES,
     "image_generation": "Please generate an image of ``{text}'': {image}",
     "video_generation": "Please generate a video for ``{text}'': {video}",
     "tts": "Please generate a speech of ``{text}'': {speech}"},
    {**PAIR_TASKS,
     "descriptive_image_generation": "Please generate an image according to the caption.\n{text}",
     "tts": "The transcription is ``{text}''. Please generate a speech according to the given transcription. "
            "Start with <spch>.",
     "video_generation": "Please generate a video for ``{text}''"})
TEMPLATE_SETS: dict[str, TemplateSet] = {s.name: s for s in (PAPER, MIO_RELEASE)}


def template_set(name: str) -> TemplateSet:
    if name not in TEMPLATE_SETS:
        raise MioUserError(f"unknown template set {name!r}; expected one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


def condition_removed(text: str, replacement: str = "") -> str | None:
    """``text`` with its condition replaced by ``replacement`` when it is the user turn of a
    generation pair task (an SFT task whose template holds ``{text}``, in any template set):
    the wording condition dropout trains the unconditional branch with. None for other text."""
    for templates in TEMPLATE_SETS.values():
        for template in templates.pair_tasks.values():
            before, found, after = template.partition("{text}")
            if found and len(text) >= len(before) + len(after) and text.startswith(before) and text.endswith(after):
                return before + replacement + after
    return None


def pair_conversation(task: str, media: Segment, text: str, templates: TemplateSet = PAPER,
                      draw: ConditionDraw | None = None) -> list[Turn]:
    """A (media, text) pair -> a two-turn conversation of the given SFT task family (``draw``: the
    sample's condition dropout, for the tasks that ask for media)."""
    if task not in templates.pair_tasks:
        raise MioUserError(f"unknown pair task {task!r}; expected one of {sorted(templates.pair_tasks)}")
    template = templates.pair_tasks[task]
    if "{media}" in template:
        before, _, after = template.partition("{media}")
        question = ([Text(before)] if before else []) + [media] + ([Text(after)] if after else [])
        return [Turn("user", question), Turn("assistant", [Text(text)])]
    if draw is not None:
        text = draw.condition(task, text)
    return [Turn("user", [Text(template.replace("{text}", text))]), Turn("assistant", [media])]
