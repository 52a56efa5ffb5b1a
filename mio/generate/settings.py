"""Per-modality decoding settings and the presets they come from, overridable per call.

The setting in force for a token is the one of the block it lies in: text outside media,
image inside an ``<image>`` block, video inside an image block that follows a closed one
(a video's second and later frames), speech inside ``<spch>``.

Three presets: ``paper`` (the MIO paper's Table 8: text by beam search, media sampled),
``mio-release`` (the settings of MIO's released ``infer.py``: one setting for the whole
answer, chosen by the task, 512 new tokens, and an answer that stops at ``<|im_end|>`` in
chat and at EOS otherwise), both without classifier-free guidance as their sources, and
``guided`` (Table 8 with images and video frames sampled under guidance 3 and top-k 2000,
the values Emu3 and Lumina-mGPT publish).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO

MODES = (TEXT, IMAGE, VIDEO, SPEECH)


@dataclass(frozen=True)
class DecodeSettings:
    """How one modality's tokens are chosen: beam search, greedy or sampling.

    Field names and meanings are those of transformers' ``GenerationConfig``; ``top_k=0``
    switches top-k off, as MIO's released inference script does. ``guidance`` is the
    classifier-free guidance scale of a media modality (1 = off): the next token's logits are
    ``uncond + guidance * (cond - uncond)`` before every other step (transformers' order for its
    ``guidance_scale``). Beam search with guidance is refused.
    """

    num_beams: int = 1
    do_sample: bool = True
    top_p: float = 0.7
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    guidance: float = 1.0

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise MioUserError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise MioUserError("beam search is deterministic here: set do_sample=False when num_beams > 1")
        if not 0.0 < self.top_p <= 1.0:
            raise MioUserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MioUserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.temperature <= 0.0:
            raise MioUserError(f"temperature must be positive, got {self.temperature}")
        if self.repetition_penalty <= 0.0:
            raise MioUserError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.guidance <= 0.0:
            raise MioUserError(f"guidance must be positive (1 = off), got {self.guidance}")
        if self.guided and self.num_beams > 1:
            raise MioUserError(f"beam search with guidance is not supported: guidance {self.guidance} needs num_beams=1 "
                             f"(got {self.num_beams}); set num_beams=1, or guidance=1")

    def penalties(self) -> LogitsProcessorList:
        """What transformers runs before a user's logits processors (the constraint)."""
        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        return out

    def warpers(self) -> LogitsProcessorList:
        """What transformers runs after them when sampling, in its order."""
        out = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                out.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(self.top_p))
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of transformers' ``model.generate`` (which has no
        guidance on a batch row of its own: guided settings have no such equivalent)."""
        if self.guided:
            raise ValueError("guided settings have no transformers generate() equivalent here")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "guidance"}


# Table 8 of the paper: text by beam search, media by nucleus sampling.
TABLE8: dict[str, DecodeSettings] = {
    TEXT: DecodeSettings(num_beams=5, do_sample=False, top_p=1.0),
    IMAGE: DecodeSettings(top_p=0.7),
    SPEECH: DecodeSettings(top_p=0.7, repetition_penalty=1.15),
    VIDEO: DecodeSettings(top_p=0.7, repetition_penalty=1.15),
}


def _everywhere(s: DecodeSettings) -> dict[str, DecodeSettings]:
    return {m: s for m in MODES}


# MIO's released infer.py: one generation config per task, applied to the whole answer
# (text and media alike); top_k 0 and length penalty 1.0 throughout.
_GREEDY5 = dict(num_beams=5, do_sample=False, top_p=1.0)
_SAMPLED = dict(num_beams=1, do_sample=True, top_p=0.7)
RELEASE_TASKS: dict[str, dict[str, DecodeSettings]] = {
    "text": _everywhere(DecodeSettings(**_GREEDY5, repetition_penalty=1.0)),
    "image_generation": _everywhere(DecodeSettings(**_GREEDY5, repetition_penalty=1.15)),
    "tts": _everywhere(DecodeSettings(**_SAMPLED, repetition_penalty=1.15)),
    "speech_generation": _everywhere(DecodeSettings(**_GREEDY5, repetition_penalty=2.0)),
    "speech_to_speech": _everywhere(DecodeSettings(**_GREEDY5, repetition_penalty=1.15)),
    "video_generation": _everywhere(DecodeSettings(**_SAMPLED, repetition_penalty=1.15)),
    "interleaved": _everywhere(DecodeSettings(**_SAMPLED, repetition_penalty=1.15)),
}
# SFT task families (mio.templates.PAIR_TASKS) whose answer is one of the release's tasks.
TASK_ALIASES = {"descriptive_image_generation": "image_generation", "image_captioning": "text", "asr": "text",
                "video_understanding": "text"}

STOP_ANY, STOP_TURN = "any", "turn"


@dataclass(frozen=True)
class Preset:
    """Decoding defaults by name: per-modality settings (per task where the source has them),
    the new-token limit, and where an answer stops.

    ``stop``: ``any`` stops at every EOS id and at ``<|im_end|>``; ``turn`` stops at
    ``<|im_end|>`` with the chat template and at the tokenizer's EOS without it (MIO's
    ``infer.py``: id 7 for Instruct, EOS for Base).
    """

    name: str
    tasks: Mapping[str, Mapping[str, DecodeSettings]]  # task -> modality -> settings; "text" is the default task
    max_new_tokens: int
    stop: str

    def task_of(self, task: str | None, outputs: Iterable[str] | None, speech_in_prompt: bool) -> str:
        """The preset's task for a request: ``task`` when named, else what ``outputs`` asks for."""
        if len(self.tasks) == 1:
            return next(iter(self.tasks))
        if task is not None:
            task = TASK_ALIASES.get(task, task)
            if task not in self.tasks:
                raise MioUserError(f"preset {self.name!r} has no settings for task {task!r}; known tasks: "
                                 f"{sorted(self.tasks)} (or leave the task out and name --outputs)")
            return task
        wanted = set(outputs or ())
        media = wanted - {TEXT}
        if not media:
            return "text"
        if TEXT in wanted:  # text with images, video or speech: a visual story
            return "interleaved"
        if media == {SPEECH}:
            return "speech_to_speech" if speech_in_prompt else "speech_generation"
        if media == {IMAGE}:
            return "image_generation"
        if media == {VIDEO}:
            return "video_generation"
        return "interleaved"

    def settings(self, task: str) -> dict[str, DecodeSettings]:
        return dict(self.tasks[task])


# Classifier-free guidance on images and video frames with the values published for
# discrete-token image generators: scale 3.0 (Emu3's README, with top-k 2048 over its 32k
# codebook; Lumina-mGPT's README uses 4.0) and top-k 2000 over the image codes, Lumina-mGPT's
# `image_top_k` on Chameleon's 8192-code image vocabulary -- the size of SEED's codebook.
# Top-p off and temperature 1, as both. Text and speech keep Table 8 (no anchor guides speech).
GUIDED_MEDIA = DecodeSettings(top_p=1.0, top_k=2000, guidance=3.0)
GUIDED: dict[str, DecodeSettings] = {**TABLE8, IMAGE: GUIDED_MEDIA,
                                     VIDEO: dataclasses.replace(GUIDED_MEDIA, repetition_penalty=1.15)}

PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", {"any": TABLE8}, max_new_tokens=1024, stop=STOP_ANY),
    "mio-release": Preset("mio-release", RELEASE_TASKS, max_new_tokens=512, stop=STOP_TURN),
    "guided": Preset("guided", {"any": GUIDED}, max_new_tokens=1024, stop=STOP_ANY),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MioUserError(f"unknown decoding preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_settings(overrides: Mapping[str, DecodeSettings | Mapping[str, Any]] | None = None,
                     base: Mapping[str, DecodeSettings] = TABLE8) -> dict[str, DecodeSettings]:
    """``base`` (Table 8 by default), with whole settings or single fields replaced per modality.

    ``{"text": {"num_beams": 1}}`` keeps text greedy; ``{"speech": DecodeSettings(...)}``
    replaces speech's settings; ``{"all": {...}}`` applies to every modality first (its
    ``guidance`` to the media modalities only: guidance works inside media blocks).
    """
    out = dict(base)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(MODES) - {"all"}
    if unknown:
        raise MioUserError(f"decoding settings for unknown modality {sorted(unknown)}; expected {MODES} or 'all'")
    if "all" in overrides:
        every = overrides.pop("all")
        for mode in MODES:
            fields = every if mode != TEXT else dataclasses.replace(every, guidance=1.0) \
                if isinstance(every, DecodeSettings) else {k: v for k, v in every.items() if k != "guidance"}
            out[mode] = _apply(out[mode], fields, "all")
    for mode, value in overrides.items():
        out[mode] = _apply(out[mode], value, mode)
    return out


def _apply(current: DecodeSettings, value: DecodeSettings | Mapping[str, Any], mode: str) -> DecodeSettings:
    guidance = value.guidance if isinstance(value, DecodeSettings) else value.get("guidance", 1.0)
    if mode == TEXT and guidance != 1.0:
        raise MioUserError(f"text.guidance is {guidance}: guidance applies inside media blocks only; set "
                         "image.guidance, video.guidance or speech.guidance")
    if isinstance(value, DecodeSettings):
        return value
    fields = {f.name: f.type for f in dataclasses.fields(DecodeSettings)}
    unknown = set(value) - set(fields)
    if unknown:
        raise MioUserError(f"unknown decoding setting {sorted(unknown)} for {mode}; known: {sorted(fields)}")
    changes = dict(value)
    if changes.get("num_beams", current.num_beams) > 1 and "do_sample" not in changes:
        changes["do_sample"] = False  # asking for beams implies deterministic search
    try:
        return dataclasses.replace(current, **changes)
    except ValueError as err:
        raise MioUserError(f"{mode} decoding settings: {err}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"speech.repetition_penalty=1.2"`` -> ("speech", "repetition_penalty", 1.2)."""
    key, sep, raw = text.partition("=")
    mode, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise MioUserError(f"decoding override {text!r} must look like MODALITY.FIELD=VALUE, e.g. text.num_beams=1")
    kinds = {f.name: f.type for f in dataclasses.fields(DecodeSettings)}
    if name not in kinds:
        raise MioUserError(f"decoding override {text!r}: unknown field {name!r}; known: {sorted(kinds)}")
    raw = raw.strip()
    kind = kinds[name]
    try:
        if kind in ("bool", bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise MioUserError(raw)
            value: Any = raw.lower() in ("true", "1", "yes")
        elif kind in ("int", int):
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise MioUserError(f"decoding override {text!r}: {raw!r} is not a valid {kind} for {name}") from None
    return mode, name, value


def overrides_from_strings(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        mode, name, value = parse_override(item)
        out.setdefault(mode, {})[name] = value
    return out
