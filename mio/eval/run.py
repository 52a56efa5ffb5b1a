"""`mio eval`'s work: answer every item of an eval set with a model, score the answers with the
paper's metrics, and write what a reader checks them against.

    from mio.eval.run import EvalSettings, evaluate
    metrics, rows = evaluate(Generator("runs/sft/model"), ["data/coco_val"], EvalSettings(tasks=("image_captioning",)), "eval/")

Leaves in the output folder ``generations.jsonl`` (one row per item: prompt, answer, references,
scores), ``metrics.json`` (per task) and ``report.html`` (both as tables), and ``media/`` with the
decoded answers a metric listens to or looks at (TTS, image generation). Under torchrun or srun
the ranks share the batches and rank 0 writes what one process would (:mod:`mio.generate.spread`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mio.data.ranks import resolve_ranks
from mio.eval.metrics import (
    IOU_THRESHOLD,
    ClipScorer,
    Transcriber,
    caption_scores,
    exact_match,
    local_folder,
    normalize_transcript,
    top_box_iou,
    vqa_accuracy,
    word_error_rates,
)
from mio.eval.report import write_html
from mio.eval.tasks import (
    ASR,
    CAPTION,
    GROUNDING,
    GROUNDING_FIGURES,
    IMAGE_GENERATION,
    OUTPUTS,
    TTS,
    VQA,
    EvalItem,
    answer_text,
    read_eval_set,
    task_kind,
)
from mio.generate.detok import DEFAULT_UNCLIP, UnclipSettings
from mio.generate.generator import Generation, Generator
from mio.generate.spread import Spread
from mio.log import info
from mio.segments import Box, Image, Segment, Speech, Text, Video
from mio.userio import MioUserError


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how to decode. ``decode`` overrides Table 8 per modality, as
    ``mio generate --set`` does (``{"all": {"num_beams": 1, "do_sample": False}}``: greedy)."""

    tasks: tuple[str, ...]
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    decode: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    limit: int | None = None  # items per task
    asr_model: str | None = None  # a transformers ASR folder: TTS WER
    clip_model: str | None = None  # a CLIP folder: CLIP score of generated images
    unclip: UnclipSettings = DEFAULT_UNCLIP
    device: str | None = None  # of the ASR and CLIP models

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise MioUserError(f"max_new_tokens ({self.max_new_tokens}) and batch_size ({self.batch_size}) must be positive")


@dataclass
class EvalAnswer:
    """One item's answer and scores, as written to generations.jsonl."""

    item: EvalItem
    generation: Generation
    scores: dict[str, float] = field(default_factory=dict)
    media: list[str] = field(default_factory=list)  # decoded answer files, relative to the output folder
    transcript: str | None = None  # TTS: what the ASR model heard
    note: str = ""

    def answer(self) -> str:
        return answer_text(self.generation.segments)

    def to_json(self) -> dict[str, Any]:
        g = self.generation
        row = {"id": self.item.id, "task": self.item.task, "samples": self.item.keys,
               "prompt": show_turns(self.item.prompt), "answer": show(g.segments), "answer_text": self.answer(),
               "references": [show(r) for r in self.item.references], "condition": self.item.condition,
               "scores": self.scores, "media": self.media, "stopped": g.stopped, "new_tokens": len(g.result.ids)}
        if self.transcript is not None:
            row["transcript"] = self.transcript
        if g.partial is not None:
            row["partial"] = g.partial.detail
        if self.note:
            row["note"] = self.note
        return row


def show(segments: Sequence[Segment]) -> str:
    """Segments as one line of text, media as bracketed placeholders."""
    parts = []
    for s in segments:
        if isinstance(s, Text):
            parts.append(s.text)
        elif isinstance(s, Image):
            parts.append("[image]")
        elif isinstance(s, Video):
            parts.append(f"[video: {np.asarray(s.frames).shape[0]} frames]")
        elif isinstance(s, Speech):
            layers, frames = np.asarray(s.codes).shape
            parts.append(f"[speech: {layers} x {frames} codes]")
        elif isinstance(s, Box):
            phrase = f"<phrase>{s.phrase}</phrase>" if s.phrase is not None else ""
            parts.append(phrase + "[box " + " ".join(f"{v:.3f}" for v in s.coords) + "]")
    return "".join(parts).strip()


def show_turns(turns: Sequence[Any]) -> str:
    return "\n".join(f"{t.role}: {show(t.content)}" for t in turns)


def answer_batch(generator: Generator, prompts: Sequence[Any], settings: EvalSettings, task: str) -> list[Generation]:
    """Answers to prompts of one task, decoded as one batch. The answer may hold text and the
    modality the task's metric scores (:data:`mio.eval.tasks.OUTPUTS`): a caption is text, a
    TTS answer speech."""
    decode = {k: dict(v) for k, v in settings.decode.items()}
    kind = task_kind(task)
    return generator.generate_batch(prompts, chat=True, task=task, max_new_tokens=settings.max_new_tokens,
                                    settings=decode, outputs=OUTPUTS[kind] if kind is not None else None,
                                    seed=settings.seed)


def evaluate(generator: Generator, data: Sequence[str | os.PathLike], settings: EvalSettings,
             out: str | os.PathLike, log: Callable[[str], None] | None = None,
             spread: Spread | None = None) -> tuple[dict[str, Any], list[EvalAnswer]] | None:
    """Answer, score and write; returns the metrics (also ``out/metrics.json``) and every item's
    answer with its scores. ``spread``: the ranks of a torchrun or srun job, each answering its
    batches (:mod:`mio.generate.spread`); rank 0 scores and writes them all in item order, the
    other ranks return None."""
    log = log or info
    spread = spread or Spread(resolve_ranks(0, 1))
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evalset = read_eval_set(data, settings.tasks, settings.limit)
    scorers = _Scorers(settings)  # model folders checked before any generation
    by_task: dict[str, list[EvalItem]] = {}
    for item in evalset.items:
        by_task.setdefault(item.task, []).append(item)
    # The batches one process decodes, task by task; each rank answers its share of them.
    batches = [(task, items[i:i + settings.batch_size]) for task, items in by_task.items()
               for i in range(0, len(items), settings.batch_size)]
    mine: list[tuple[int, list[EvalAnswer]]] = []
    todo = spread.batches(len(batches))
    t0 = time.perf_counter()
    for n, b in enumerate(todo, 1):
        task, chunk = batches[b]
        mine.append((b, [EvalAnswer(item, g) for item, g in zip(chunk, answer_batch(generator, [x.prompt for x in chunk],
                                                                               settings, task))]))
        log(f"eval: {n}/{len(todo)} batches answered"
            f"{f' on rank {spread.ranks.rank}' if spread.ranks.world > 1 else ''} ({time.perf_counter() - t0:.1f}s; "
            f"{task}: {len(chunk)} items)")
    gathered = spread.gather(mine)
    if gathered is None:
        return None
    rows = [r for batch in gathered for r in batch]
    metrics: dict[str, Any] = {"model": generator.name, "data": [str(d) for d in data], "tasks": {},
                               "not_computed": {}, "skipped_samples": evalset.skipped, "missing_tasks": evalset.missing}
    for task in by_task:
        task_rows = [r for r in rows if r.item.task == task]
        figures, not_computed = score_task(task, task_rows, generator, scorers, out)
        metrics["tasks"][task] = {"items": len(task_rows), **figures}
        metrics["not_computed"].update({f"{task}/{k}": v for k, v in not_computed.items()})
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(out, rows, metrics)
    return metrics, rows


class _Scorers:
    """The models behind TTS WER and CLIP score, loaded on first use."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        wants = {task_kind(t) for t in settings.tasks}
        self.asr_folder = settings.asr_model if TTS in wants else None
        self.clip_folder = settings.clip_model if IMAGE_GENERATION in wants else None
        for flag, folder in (("--asr-model", self.asr_folder), ("--clip-model", self.clip_folder)):
            if folder is not None:
                local_folder(folder, flag)  # checked before any generation
        self._asr: Transcriber | None = None
        self._clip: ClipScorer | None = None

    def asr(self) -> Transcriber:
        if self._asr is None:
            assert self.asr_folder is not None
            self._asr = Transcriber(self.asr_folder, self.settings.device)
        return self._asr

    def clip(self) -> ClipScorer:
        if self._clip is None:
            assert self.clip_folder is not None
            self._clip = ClipScorer(self.clip_folder, self.settings.device)
        return self._clip


def score_task(task: str, rows: list[EvalAnswer], generator: Generator, scorers: _Scorers,
               out: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Per-row scores (into the rows) and the task's figures; metrics that cannot be computed
    are named with the reason."""
    for r in rows:
        r.scores["exact"] = float(any(exact_match(r.generation.segments, ref) for ref in r.item.references))
    figures = {"exact": float(np.mean([r.scores["exact"] for r in rows]))}
    not_computed: dict[str, str] = {}
    kind = task_kind(task)
    if kind == CAPTION:
        corpus, each = caption_scores([r.item.reference_texts() for r in rows], [r.answer() for r in rows])
        figures.update(corpus)
        for r, s in zip(rows, each):
            r.scores.update(s)
    elif kind == VQA:
        for r in rows:
            r.scores["vqa_accuracy"] = vqa_accuracy(r.answer(), r.item.reference_texts())
        figures["vqa_accuracy"] = float(np.mean([r.scores["vqa_accuracy"] for r in rows]))
    elif kind == ASR:
        figures.update(_wer(rows, "wer", [r.item.reference_texts()[0] for r in rows], [r.answer() for r in rows]))
    elif kind == TTS:
        if scorers.asr_folder is None:
            not_computed["tts_wer"] = "needs --asr-model (a local transformers speech recognition folder)"
        else:
            _transcribe(rows, generator, scorers.asr(), out)
            figures.update(_wer(rows, "tts_wer", [r.item.condition for r in rows], [r.transcript or "" for r in rows]))
    elif kind == GROUNDING:
        name = GROUNDING_FIGURES[task]
        for r in rows:
            r.scores["iou"] = top_box_iou(r.generation.segments, r.item.references)
            r.scores[name] = float(r.scores["iou"] >= IOU_THRESHOLD)
        figures[name] = float(np.mean([r.scores[name] for r in rows]))
        figures["mean_iou"] = float(np.mean([r.scores["iou"] for r in rows]))
    elif kind == IMAGE_GENERATION:
        if scorers.clip_folder is None:
            not_computed["clip_score"] = "needs --clip-model (a local CLIP folder)"
        else:
            figures["clip_score"] = _clip_scores(rows, generator, scorers.clip(), scorers.settings.unclip, out)
    return figures, not_computed


def _wer(rows: list[EvalAnswer], name: str, references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """WER over the rows whose reference normalizes to words; the others are counted, not scored."""
    keep = [i for i, ref in enumerate(references) if normalize_transcript(ref).strip()]
    for i in set(range(len(rows))) - set(keep):
        rows[i].note = f"{name}: the reference is empty after Whisper normalization; not scored"
    if not keep:
        return {f"{name}_unscored": float(len(rows))}
    corpus, each = word_error_rates([references[i] for i in keep], [hypotheses[i] for i in keep])
    for i, w in zip(keep, each):
        rows[i].scores[name] = w
    figures = {name: corpus}
    if len(keep) < len(rows):
        figures[f"{name}_unscored"] = float(len(rows) - len(keep))
    return figures


def _media_dir(out: Path, row: EvalAnswer) -> Path:
    return out / "media" / re.sub(r"[^A-Za-z0-9_.-]+", "_", row.item.id)


def _decode(rows: list[EvalAnswer], generator: Generator, out: Path, kind: str, unclip: UnclipSettings) -> list[Path | None]:
    """Each row's first decoded ``kind`` answer file (None, with a note, when there is none)."""
    files: list[Path | None] = []
    for r in rows:
        folder = _media_dir(out, r)
        decoded = [d for d in generator.decode(r.generation, folder, unclip) if d.kind == kind]
        r.media = [str((folder / d.file).relative_to(out)) for d in decoded if d.file]
        if not decoded or decoded[0].file is None:
            r.note = f"no {kind} in the answer" if not decoded else decoded[0].note
            files.append(None)
        else:
            files.append(folder / decoded[0].file)
    return files


def _transcribe(rows: list[EvalAnswer], generator: Generator, asr: Transcriber, out: Path) -> None:
    """TTS: the answer's speech decoded to a WAV and transcribed; no speech -> an empty transcript."""
    import soundfile as sf

    for r, path in zip(rows, _decode(rows, generator, out, "speech", DEFAULT_UNCLIP)):
        if path is None:
            r.transcript = ""
            continue
        wave, rate = sf.read(str(path), dtype="float32")
        r.transcript = asr([wave], rate)[0]


def _clip_scores(rows: list[EvalAnswer], generator: Generator, clip: ClipScorer, unclip: UnclipSettings, out: Path) -> float:
    """Image generation: the answer's image against the condition text; no image scores 0."""
    from PIL import Image as PILImage

    files = _decode(rows, generator, out, "image", unclip)
    scored = [(r, p) for r, p in zip(rows, files) if p is not None]
    values = clip([PILImage.open(p).convert("RGB") for _, p in scored], [r.item.condition for r, _ in scored])
    for r in rows:
        r.scores["clip_score"] = 0.0
    for (r, _), v in zip(scored, values):
        r.scores["clip_score"] = v
    return float(np.mean([r.scores["clip_score"] for r in rows]))


def write_outputs(out: Path, rows: list[EvalAnswer], metrics: dict[str, Any]) -> None:
    with open(out / "generations.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_html(out / "report.html", [r.to_json() for r in rows], metrics)
