"""Per-modality decoding settings (MIO paper, Table 8), overridable per call.

The setting in force for a token is the one of the block it lies in: text outside media,
image inside an ``<image>`` block, video inside an image block that follows a closed one
(a video's second and later frames), speech inside ``<spch>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

MODES = ("text", "image", "video", "speech")


@dataclass(frozen=True)
class DecodeSettings:
    """How one modality's tokens are chosen: beam search (text only), greedy or sampling.

    Field names and meanings are those of transformers' ``GenerationConfig``; ``top_k=0``
    switches top-k off, as MIO's released inference script does.
    """

    num_beams: int = 1
    do_sample: bool = True
    top_p: float = 0.7
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search is deterministic here: set do_sample=False when num_beams > 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

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
        """The same settings as keyword arguments of transformers' ``model.generate``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# Table 8 of the paper: text by beam search, media by nucleus sampling.
TABLE8: dict[str, DecodeSettings] = {
    "text": DecodeSettings(num_beams=5, do_sample=False, top_p=1.0),
    "image": DecodeSettings(top_p=0.7),
    "speech": DecodeSettings(top_p=0.7, repetition_penalty=1.15),
    "video": DecodeSettings(top_p=0.7, repetition_penalty=1.15),
}


def resolve_settings(overrides: Mapping[str, DecodeSettings | Mapping[str, Any]] | None = None,
                     base: Mapping[str, DecodeSettings] = TABLE8) -> dict[str, DecodeSettings]:
    """Table 8, with whole settings or single fields replaced per modality.

    ``{"text": {"num_beams": 1}}`` keeps text greedy; ``{"speech": DecodeSettings(...)}``
    replaces speech's settings; ``{"all": {...}}`` applies to every modality first.
    """
    out = dict(base)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(MODES) - {"all"}
    if unknown:
        raise ValueError(f"decoding settings for unknown modality {sorted(unknown)}; expected {MODES} or 'all'")
    if "all" in overrides:
        every = overrides.pop("all")
        for mode in MODES:
            out[mode] = _apply(out[mode], every, "all")
    for mode, value in overrides.items():
        out[mode] = _apply(out[mode], value, mode)
    for mode in MODES[1:]:
        if out[mode].num_beams > 1:
            raise ValueError(f"{mode} tokens are sampled or greedy: beam search (num_beams > 1) is for text only")
    return out


def _apply(current: DecodeSettings, value: DecodeSettings | Mapping[str, Any], mode: str) -> DecodeSettings:
    if isinstance(value, DecodeSettings):
        return value
    fields = {f.name: f.type for f in dataclasses.fields(DecodeSettings)}
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(f"unknown decoding setting {sorted(unknown)} for {mode}; known: {sorted(fields)}")
    changes = dict(value)
    if changes.get("num_beams", current.num_beams) > 1 and "do_sample" not in changes:
        changes["do_sample"] = False  # asking for beams implies deterministic search
    return dataclasses.replace(current, **changes)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"speech.repetition_penalty=1.2"`` -> ("speech", "repetition_penalty", 1.2)."""
    key, sep, raw = text.partition("=")
    mode, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise ValueError(f"decoding override {text!r} must look like MODALITY.FIELD=VALUE, e.g. text.num_beams=1")
    kinds = {f.name: f.type for f in dataclasses.fields(DecodeSettings)}
    if name not in kinds:
        raise ValueError(f"decoding override {text!r}: unknown field {name!r}; known: {sorted(kinds)}")
    raw = raw.strip()
    kind = kinds[name]
    try:
        if kind in ("bool", bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            value: Any = raw.lower() in ("true", "1", "yes")
        elif kind in ("int", int):
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise ValueError(f"decoding override {text!r}: {raw!r} is not a valid {kind} for {name}") from None
    return mode, name, value


def overrides_from_strings(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        mode, name, value = parse_override(item)
        out.setdefault(mode, {})[name] = value
    return out
