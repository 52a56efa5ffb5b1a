"""Any-to-any interleaved generation: prompt (text and media files, or chat turns) -> an
answer of text, images, speech and video, decoded back to files.

    gen = Generator("runs/demo/model")                     # or MIO's released folder as it ships
    out = gen.generate(["Describe this picture.", MediaFile.guess("cat.jpg")])
    gen.write(out, "answers/cat")                          # transcript.md, transcript.html, media
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from mio.generate.constraints import ModalityConstraint
from mio.generate.decoding import STOP, Decoder, DecodeResult
from mio.generate.detok import (
    DEFAULT_UNCLIP,
    ImageDecoder,
    SpeechDecoder,
    UnclipSettings,
    unclip_for,
    write_gif,
    write_wav,
)
from mio.generate.media import MediaFile
from mio.generate.results import BOX, Decoded, Generation, PartialBlock, Written
from mio.generate.settings import STOP_ANY, DecodeSettings, Preset, get_preset, resolve_settings
from mio.generate.transcript import write_transcript
from mio.model.backbone import load_backbone
from mio.segments import Box, Image, Segment, SegmentRenderer, Speech, Text, TextDecoder, Video, parse
from mio.templates import Turn, condition_removed, content_only, render_chat, unconditional_chat
from mio.tokenizers.media_tokenizers import MediaTokenizers
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, TEXT, VIDEO, VocabTable, chat_end_id, stop_ids

PromptItem = Union[str, Segment, MediaFile, os.PathLike]
Prompt = Union[str, Sequence[PromptItem], Sequence[Turn]]
OUTPUTS = (TEXT, IMAGE, SPEECH, VIDEO)


@dataclass
class Prepared:
    """One prompt made ready for the decoding loop (:meth:`Generator.prepare_batch`)."""

    turns: list[Turn]  # the prompt as given (media as files or codes)
    ids: np.ndarray  # (P,) the rendered prompt
    settings: dict[str, DecodeSettings]
    seed: int
    constraint: ModalityConstraint
    stop_ids: list[int]
    max_new_tokens: int
    chat: bool
    preset: str
    uncond: np.ndarray | None = None  # (U,) the unconditional branch's prompt, where the settings guide a modality


class Generator:
    """A model folder (ours or MIO's release layout) with its modality tokenizers."""

    def __init__(self, model_dir: str | os.PathLike, tokenizers: str | os.PathLike | None = None, *,
                 unclip: str | os.PathLike | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """``dtype`` defaults to bfloat16 on CUDA (a 7B model in float32 would double its memory), float32
        on CPU; the unCLIP pipeline loads in ``dtype`` when it is given (else float16 on CUDA)."""
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        model, tokenizer, table = load_backbone(folder, dtype=dtype or (torch.bfloat16 if on_cuda else torch.float32))
        self._setup(model, tokenizer, table, MediaTokenizers.for_model(folder, tokenizers, unclip), str(folder), device)
        self.unclip_dtype = dtype

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, table: VocabTable, media: MediaTokenizers | None = None,
                    name: str = "model", device: str | None = None) -> "Generator":
        """A generator over a model already in memory (a notebook, right after training; the tests)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, table, media or MediaTokenizers({}), name, device)
        return self

    def _setup(self, model: Any, tokenizer: Any, table: VocabTable, media: MediaTokenizers, name: str,
               device: str | None) -> None:
        target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = target
        self.unclip_dtype: torch.dtype | None = None
        self.model = model.to(target).eval()
        self.tokenizer = tokenizer
        self.table = table
        self.media = media
        self.name = name
        self.renderer = SegmentRenderer(tokenizer, table)  # the data path's own text -> ids
        self.text_decoder = TextDecoder(tokenizer)  # ids -> text, for every answer
        self.stop_ids = stop_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        self._image_decoders: dict[UnclipSettings, ImageDecoder] = {}
        self._unclip: tuple[Any, str] | None = None  # (pipeline, where it came from), built on first use
        self._speech_decoder: SpeechDecoder | None = None

    # --- prompt ----------------------------------------------------------------------------
    def prompt_turns(self, prompt: Prompt) -> list[Turn]:
        """Any accepted prompt form -> turns whose media are still files or codes."""
        if isinstance(prompt, str):
            return [Turn("user", [Text(prompt)])]
        items = list(prompt)
        if items and all(isinstance(t, Turn) for t in items):
            return items  # type: ignore[return-value]
        if any(isinstance(t, Turn) for t in items):
            raise MioUserError("a prompt is either a list of chat turns or a list of items, not a mix")
        return [Turn("user", [_as_item(x) for x in items])]

    def encode_turns(self, turns: Sequence[Turn]) -> list[Turn]:
        """Media files -> code segments (every file checked before any tokenizer is built)."""
        for t in turns:
            for x in t.content:
                if isinstance(x, MediaFile):
                    x.check()
        return [Turn(t.role, [self.media.encode_file(x.kind, x.path).segment() if isinstance(x, MediaFile) else x
                              for x in t.content]) for t in turns]

    def prompt_segments(self, turns: Sequence[Turn], chat: bool = True, task: str | None = None) -> list[Segment]:
        """Turns of code segments -> what the model reads: ChatML with MIO's system prompt, or the
        raw concatenation of the turns' content (speech as input keeps its content layer)."""
        if chat:
            return render_chat(list(turns), task=task, add_generation_prompt=True)
        return [content_only(x) for t in turns for x in t.content]

    def unconditional_segments(self, turns: Sequence[Turn], chat: bool = True, task: str | None = None,
                               negative_prompt: str | None = None) -> list[Segment]:
        """The unconditional branch of guided decoding: the conversation with its condition removed,
        ``negative_prompt`` (if any) in its place. In a chat: its system prompt, then one user turn --
        the last user turn's wording with the condition emptied where it is a generation pair task's
        (the form condition dropout trains), else only the negative prompt (empty when None). Without
        the chat template: the negative prompt alone (after the tokenizer's BOS)."""
        replacement = negative_prompt or ""
        if not chat:
            return [Text(replacement)] if replacement else []
        last = next((t.content for t in reversed(turns) if t.role == "user"), [])
        wording = condition_removed(last[0].text, replacement) if len(last) == 1 and isinstance(last[0], Text) else None
        text = wording if wording is not None else replacement
        return unconditional_chat(turns, task, [Text(text)] if text else [])

    # --- generation ------------------------------------------------------------------------
    def generate(self, prompt: Prompt, *, chat: bool = True, task: str | None = None, preset: str = "paper",
                 max_new_tokens: int | None = None,
                 settings: Mapping[str, DecodeSettings | Mapping[str, Any]] | None = None,
                 outputs: Iterable[str] | None = None, seed: int = 0, use_cache: bool = True,
                 max_speech_frames: int = 750, negative_prompt: str | None = None) -> Generation:
        """Generate an answer.

        ``preset`` names the decoding defaults (``paper``: Table 8; ``mio-release``: MIO's
        ``infer.py``, one setting per task for the whole answer); ``settings`` overrides them per
        modality (see :func:`resolve_settings`). ``outputs`` says which modalities the answer
        may contain (default: every modality the model has tokens for); without ``text`` the
        answer is media only. ``max_new_tokens`` defaults to the preset's and is capped at what
        the model's positions allow (the result's ``notes`` say so). ``task`` chooses MIO's
        speech-only system prompt (tts, speech_generation; also used for a speech-only answer)
        and the release preset's task.

        Classifier-free guidance (a modality's ``guidance`` setting above 1, or the ``guided``
        preset) decodes the unconditional branch beside the answer: the same conversation with
        the condition removed (:meth:`unconditional_segments`), or with ``negative_prompt`` in its
        place; a prompt that ends inside an open media block lends the block's start to it too.
        """
        return self.generate_batch([prompt], chat=chat, task=task, preset=preset, max_new_tokens=max_new_tokens,
                                   settings=settings, outputs=outputs, seed=seed, use_cache=use_cache,
                                   max_speech_frames=max_speech_frames, negative_prompt=negative_prompt)[0]

    def generate_batch(self, prompts: Sequence[Prompt], *, chat: bool = True, task: str | None = None,
                       preset: str = "paper", max_new_tokens: int | None = None,
                       settings: Mapping[str, DecodeSettings | Mapping[str, Any]] | None = None,
                       outputs: Iterable[str] | None = None, seed: int | Sequence[int] = 0, use_cache: bool = True,
                       max_speech_frames: int = 750, negative_prompt: str | None = None) -> list[Generation]:
        """Answers to several prompts, decoded together (the keywords are :meth:`generate`'s).

        Each prompt keeps its own constraint state and settings (a preset may choose settings
        by what the prompt holds) and is seeded on its own (``seed``: one for every prompt, or
        one per prompt): answer ``i`` is what ``generate(prompts[i], seed=...)`` gives, up to
        the float rounding of a batched forward.
        """
        prepared = self.prepare_batch(prompts, chat=chat, task=task, preset=preset, max_new_tokens=max_new_tokens,
                                      settings=settings, outputs=outputs, seed=seed, max_speech_frames=max_speech_frames,
                                      negative_prompt=negative_prompt)
        decoder = Decoder(self.model, use_cache=use_cache)
        seqs = [decoder.start(p.ids, p.max_new_tokens, p.seed, p.settings, p.constraint, p.stop_ids, uncond_ids=p.uncond)
                for p in prepared]
        while decoder.busy:
            decoder.step()
        return [self.finish(p, s.result) for p, s in zip(prepared, seqs)]

    def prepare_batch(self, prompts: Sequence[Prompt], *, chat: bool = True, task: str | None = None,
                      preset: str = "paper", max_new_tokens: int | None = None,
                      settings: Mapping[str, DecodeSettings | Mapping[str, Any]] | None = None,
                      outputs: Iterable[str] | None = None, seed: int | Sequence[int] = 0,
                      max_speech_frames: int = 750, negative_prompt: str | None = None) -> list[Prepared]:
        """Prompts -> what the decoding loop needs for each (:meth:`generate`'s keywords): its ids,
        settings, seed, constraint, stop tokens and limit. `mio serve` starts them in its running
        loop as requests come; :meth:`finish` turns each result into a :class:`Generation`."""
        prompts = list(prompts)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else [int(x) for x in seed]
        if not prompts or len(seeds) != len(prompts):
            raise ValueError(f"generate_batch needs at least one prompt and one seed per prompt (or one seed): got "
                             f"{len(prompts)} prompts and {len(seeds)} seeds")
        chosen = get_preset(preset)
        outputs = None if outputs is None else tuple(outputs)
        wanted = self._check_outputs(outputs)
        if task is None and outputs is not None and set(outputs) == {SPEECH}:
            system_task = "speech_generation"  # a speech-only answer: MIO's speech-only system prompt ("voice" mode)
        else:
            system_task = task
        stop_ids = self.stop_ids_for(chosen, chat)
        constraint = ModalityConstraint(self.table, max_speech_frames=max_speech_frames,
                                        allow_image=wanted[IMAGE] or wanted[VIDEO], allow_speech=wanted[SPEECH],
                                        text_only_stops=None if wanted[TEXT] else stop_ids)
        limit = chosen.max_new_tokens if max_new_tokens is None else max_new_tokens
        out = []
        for n, (prompt, sd) in enumerate(zip(prompts, seeds)):
            where = f"prompt {n}: " if len(prompts) > 1 else ""
            turns = self.prompt_turns(prompt)
            encoded = self.encode_turns(turns)
            speech_in = any(isinstance(x, Speech) for t in encoded for x in t.content)
            resolved = resolve_settings(settings, chosen.settings(chosen.task_of(task, outputs, speech_in)))
            segments = self.prompt_segments(encoded, chat, system_task)
            ids = self.renderer(segments, where=f"prompt {n}").input_ids
            if ids.size == 0:
                raise MioUserError(f"{where}the prompt is empty and the tokenizer has no BOS token to start from")
            guided = any(cfg.guided for cfg in resolved.values())
            uncond = self._unconditional_ids(constraint, ids, self.unconditional_segments(
                encoded, chat, system_task, negative_prompt), n) if guided else None
            out.append(Prepared(turns, ids, resolved, sd, constraint, stop_ids, limit, chat, chosen.name, uncond))
        return out

    def _unconditional_ids(self, constraint: ModalityConstraint, prompt_ids: np.ndarray, segments: list[Segment],
                           n: int) -> np.ndarray:
        """The unconditional branch's ids; a prompt that ends inside an open block (``... <image>``)
        lends the block's start, so both branches read the block's codes in the same place."""
        ids = self.renderer(segments, where=f"prompt {n} (unconditional branch)").input_ids
        opened = constraint.state(prompt_ids)
        if opened.kind != TEXT:
            ids = np.concatenate([ids, prompt_ids[opened.start:]])
        if ids.size == 0:
            raise MioUserError(f"prompt {n}: the unconditional branch of guided decoding is empty (no chat template, no "
                             "negative prompt, and the tokenizer adds no BOS token): give a negative prompt")
        return ids

    def finish(self, prepared: Prepared, result: DecodeResult) -> Generation:
        """A decoded sequence -> its :class:`Generation` (the answer's segments, a cut-off block)."""
        answer, partial = self._split(prepared.constraint, prepared.ids, result)
        return Generation(prepared.turns, prepared.ids, result, answer, partial, prepared.settings, prepared.seed,
                          prepared.chat, prepared.preset)

    def stop_ids_for(self, preset: Preset, chat: bool) -> list[int]:
        """Where an answer ends: every EOS id and ``<|im_end|>`` (``any``); or, as MIO's release,
        ``<|im_end|>`` in a chat and the tokenizer's EOS without the chat template (``turn``)."""
        if preset.stop == STOP_ANY:
            return self.stop_ids
        im_end = chat_end_id(self.tokenizer)
        if chat and im_end is not None:
            return [im_end]
        if self.tokenizer.eos_token_id is None:
            raise MioUserError(f"{self.name}: the tokenizer has no EOS token for a {preset.name} answer to stop at")
        return [int(self.tokenizer.eos_token_id)]

    def _check_outputs(self, outputs: Iterable[str] | None) -> dict[str, bool]:
        rows = self.model.get_output_embeddings().weight.shape[0]
        t = self.table
        available = {TEXT: True,
                     IMAGE: t.image_codebook_size > 0 and max(t.image_end_id, t.image_end + 1) <= rows,
                     SPEECH: t.speech_codebook_size > 0 and max(t.speech_end_id, t.speech_end + 1) <= rows}
        available[VIDEO] = available[IMAGE]
        if outputs is None:
            return available
        wanted = set(outputs)
        unknown = wanted - set(OUTPUTS)
        if unknown or not wanted:
            raise MioUserError(f"unknown output modality {sorted(unknown)}; expected some of {OUTPUTS}" if unknown
                             else f"no output modality given; expected some of {OUTPUTS}")
        for kind in (IMAGE, SPEECH, VIDEO):
            if kind in wanted and not available[kind]:
                raise MioUserError(f"{self.name}: {kind} output was requested but the model has no {kind} code tokens "
                                 f"(its output layer scores {rows} tokens)")
        return {k: k in wanted for k in OUTPUTS}

    def _split(self, constraint: ModalityConstraint, prompt_ids: np.ndarray,
               result: DecodeResult) -> tuple[list[Segment], PartialBlock | None]:
        """The answer's ids -> complete segments, and the block the token limit cut, if any.

        A prompt that ends inside an open block (``... an image of a cat: <image>``) lends
        that block's start to the answer, so the answer parses.
        """
        ids = list(result.ids)
        if result.stopped == STOP:
            ids = ids[:-1]
        p = len(prompt_ids)
        opened = constraint.state(prompt_ids)
        lead = [int(i) for i in prompt_ids[opened.start:]] if opened.start >= 0 else []  # a block or box open
        full = np.concatenate([prompt_ids, np.asarray(ids, dtype=np.int64)])
        end = constraint.state(full)
        partial = None
        if end.start >= 0:  # a media block, or a box or phrase, the limit cut
            cut = max(end.start - p, 0)
            inside = len(full) - end.start - 1
            kind = end.kind if end.kind != TEXT else "box"
            want = {IMAGE: f"{constraint.tokens_per_image} image codes", SPEECH: "all speech layers",
                    "box": "its location tokens"}[kind]
            partial = PartialBlock(kind, inside, f"the token limit ({len(result.ids)} new tokens) stopped generation "
                                                 f"inside {'an' if kind == IMAGE else 'a'} {kind} block after {inside} "
                                                 f"{'location tokens' if kind == 'box' else 'codes'}, before {want} "
                                                 f"and its end token; it is not decoded")
            ids = ids[:cut]
            if end.start < p:
                lead = []
        segments = parse(lead + ids, self.table, self.tokenizer, decode=self.text_decoder) if (lead or ids) else []
        return segments, partial

    # --- decoding to files -----------------------------------------------------------------
    def unclip_pipeline(self) -> tuple[Any, str]:
        """The unCLIP pipeline for decoding images (built once) and where it came from."""
        if self._unclip is None:
            self._unclip = unclip_for(self.media, self.device, self.unclip_dtype)
        return self._unclip

    def image_decoder(self, settings: UnclipSettings) -> ImageDecoder:
        if settings not in self._image_decoders:
            pipeline, _ = self.unclip_pipeline()
            self._image_decoders[settings] = ImageDecoder(self.media.get(IMAGE), pipeline, settings)
        return self._image_decoders[settings]

    def speech_decoder(self) -> SpeechDecoder:
        if self._speech_decoder is None:
            self._speech_decoder = SpeechDecoder(self.media.get(SPEECH))
        return self._speech_decoder

    def decode(self, generation: Generation, out_dir: str | os.PathLike,
               unclip: UnclipSettings = DEFAULT_UNCLIP) -> list[Decoded]:
        """Write every answer segment's media into ``out_dir``; a segment that cannot be decoded
        is reported with the reason instead."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        decoded: list[Decoded] = []
        counts = {IMAGE: 0, SPEECH: 0, VIDEO: 0}
        for seg in generation.segments:
            if isinstance(seg, Text):
                decoded.append(Decoded(TEXT, text=seg.text))
                continue
            if isinstance(seg, Box):  # drawn on the image it points at by the transcript
                decoded.append(Decoded(BOX, text=seg.phrase or "", codes=list(seg.coords)))
                continue
            kind = IMAGE if isinstance(seg, Image) else SPEECH if isinstance(seg, Speech) else VIDEO
            counts[kind] += 1
            decoded.append(self._decode_media(seg, kind, counts[kind], out, unclip))
        if generation.partial is not None:
            decoded.append(Decoded("partial", note=generation.partial.detail))
        return decoded

    def _decode_media(self, seg: Segment, kind: str, n: int, out: Path, unclip: UnclipSettings) -> Decoded:
        codes = np.asarray(seg.frames if isinstance(seg, Video) else seg.codes)
        item = Decoded(kind, codes=codes.tolist())
        try:
            if kind == IMAGE:
                item.file = f"image_{n}.png"
                self.image_decoder(unclip).decode(codes[None])[0].save(out / item.file)
            elif kind == VIDEO:
                item.file = f"video_{n}.gif"
                write_gif(out / item.file, self.image_decoder(unclip).decode(codes))
                item.note = f"{len(codes)} frames"
            else:
                item.file = f"speech_{n}.wav"
                dec = self.speech_decoder()
                wave = dec.decode(codes)
                write_wav(out / item.file, wave, dec.sample_rate)
                item.note = f"{len(wave) / dec.sample_rate:.2f} s, {codes.shape[0]} layers x {codes.shape[1]} frames"
        except Exception as err:  # noqa: BLE001 -- any detokenizer failure becomes a reported, undecoded segment
            item.file = None
            item.note = f"not decoded: {type(err).__name__}: {err}"
        return item

    def write(self, generation: Generation, out_dir: str | os.PathLike,
              unclip: UnclipSettings = DEFAULT_UNCLIP) -> Written:
        """Decode the answer and write ``transcript.md``, ``transcript.html`` and
        ``generation.json`` (ids, codes, settings) beside the media."""
        decoded = self.decode(generation, out_dir, unclip)
        info = {"model": self.name, "unclip": self._unclip[1] if self._unclip else None, "unclip_settings": unclip}
        return Written(write_transcript(Path(out_dir), generation, decoded, info), decoded)


def _as_item(x: PromptItem) -> Segment | MediaFile:
    if isinstance(x, str):
        return Text(x)
    if isinstance(x, (Text, Image, Speech, Video, Box, MediaFile)):
        return x
    if isinstance(x, os.PathLike):
        return MediaFile.guess(x)
    raise MioUserError(f"cannot use {type(x).__name__} in a prompt; expected text, a segment, a MediaFile or a path")
