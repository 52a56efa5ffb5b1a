"""The modality tokenizers a model generates with: found, built on first use, and used both
ways (prompt files -> codes, generated codes -> images, speech and video).

A model folder made by `mio fit` records its tokenizer specs (``mio_tokenizers.json``). A
``--tokenizers DIR`` replaces them per modality; DIR may hold spec files (``*.yaml``), MIO's
released checkpoint tree (``seed-tokenizer-2/``, ``SpeechTokenizer/``,
``stable-diffusion-2-1-unclip/``), or both. MIO's own model folders record nothing, so they
need ``--tokenizers`` to encode or decode media.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mio.model.backbone import load_tokenizer_specs
from mio.segments import Image, Segment, Speech, Video
from mio.vocab import IMAGE, SPEECH, VIDEO

KINDS = (IMAGE, SPEECH, VIDEO)
SPEC_KIND_TO_MODALITY = {"seed": IMAGE, "speechtokenizer": SPEECH, "video": VIDEO}

SUFFIXES = {
    IMAGE: {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"},
    SPEECH: {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif"},
    VIDEO: {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"},
}

# MIO's released checkpoint tree (DESIGN.md, Checkpoints and real weights).
MIO_SEED_DIR, MIO_SPEECH_DIR, MIO_UNCLIP_DIR = "seed-tokenizer-2", "SpeechTokenizer", "stable-diffusion-2-1-unclip"


class MissingTokenizerError(ValueError):
    """Media of a modality whose tokenizer this model does not know."""


@dataclass(frozen=True)
class MediaFile:
    """A prompt file and the modality it is read as."""

    kind: str
    path: Path

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.path}: unknown media kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def guess(cls, path: str | os.PathLike) -> "MediaFile":
        """The modality from the file name's suffix."""
        p = Path(path)
        for kind, suffixes in SUFFIXES.items():
            if p.suffix.lower() in suffixes:
                return cls(kind, p)
        raise ValueError(f"{p}: cannot tell from its suffix whether it is an image, audio or video file; "
                         f"pass it as --image, --speech or --video")

    def check(self) -> None:
        """Fail early, naming the file, when it is missing or plainly of another kind."""
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.kind} file {self.path} does not exist")
        suffix = self.path.suffix.lower()
        for other, suffixes in SUFFIXES.items():
            if other != self.kind and suffix in suffixes and not (self.kind == VIDEO and other == IMAGE and suffix == ".gif"):
                raise ValueError(f"{self.path} was given as {self.kind} but its suffix {suffix!r} says {other}")


@dataclass
class SpecSource:
    """Where one modality's tokenizer comes from: a spec file or dict, and its root folder."""

    spec: str | dict[str, Any]  # a path to a spec file, or the parsed spec
    origin: str  # for messages: which file or folder said so

    def parsed(self) -> dict[str, Any]:
        from mio.tokenizers import load_spec

        return load_spec(self.spec) if isinstance(self.spec, str) else self.spec

    def base_dir(self) -> Path:
        """The folder a spec's relative paths mean: its `root`, else its file's folder."""
        spec = self.parsed()
        if "root" in spec:
            return Path(os.path.expandvars(os.path.expanduser(str(spec["root"]))))
        return Path(self.spec).resolve().parent if isinstance(self.spec, str) else Path.cwd()


def recorded_specs(model_dir: Path) -> tuple[dict[str, SpecSource], dict[str, str]]:
    """The specs a model folder records -> (sources, reasons a recorded kind cannot be used)."""
    specs: dict[str, SpecSource] = {}
    problems: dict[str, str] = {}
    for kind, entry in (load_tokenizer_specs(model_dir) or {}).items():
        path = Path(str(entry.get("path", "")))
        same_file = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256")
        if same_file:
            specs[kind] = SpecSource(str(path), f"{path} (recorded by {model_dir})")
        elif isinstance(entry.get("content"), dict):
            specs[kind] = SpecSource(entry["content"], f"the {kind} spec recorded in {model_dir}")
        else:
            problems[kind] = (f"{model_dir} records the {kind} tokenizer spec {path}, which is missing or changed "
                              "since training; pass --tokenizers")
    return specs, problems


def specs_in_dir(folder: Path) -> tuple[dict[str, SpecSource], Path | None]:
    """Spec files and MIO's checkpoint folders in ``folder`` -> (sources, unCLIP folder or None)."""
    from mio.tokenizers import load_spec

    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizers folder {folder} does not exist")
    specs: dict[str, SpecSource] = {}
    for path in sorted(folder.glob("*.yaml")):
        kind = SPEC_KIND_TO_MODALITY[load_spec(path)["kind"]]
        if kind in specs:
            raise ValueError(f"{folder} holds two {kind} tokenizer specs: {specs[kind].origin} and {path}")
        specs[kind] = SpecSource(str(path), str(path))
    if IMAGE not in specs and (folder / MIO_SEED_DIR / "seed_quantizer.pt").is_file():
        specs[IMAGE] = SpecSource({"kind": "seed", "root": str(folder), "quantizer": f"{MIO_SEED_DIR}/seed_quantizer.pt",
                                   "vit": f"{MIO_SEED_DIR}/eva_vit_g.pth"}, str(folder / MIO_SEED_DIR))
    if SPEECH not in specs and (folder / MIO_SPEECH_DIR / "config.json").is_file():
        specs[SPEECH] = SpecSource({"kind": "speechtokenizer", "root": str(folder), "config": f"{MIO_SPEECH_DIR}/config.json",
                                    "checkpoint": f"{MIO_SPEECH_DIR}/SpeechTokenizer.pt"}, str(folder / MIO_SPEECH_DIR))
    unclip = folder / MIO_UNCLIP_DIR
    unclip = unclip if (unclip / "model_index.json").is_file() else None
    if not specs and unclip is None:
        raise ValueError(f"tokenizers folder {folder} holds neither tokenizer specs (*.yaml) nor MIO's checkpoint "
                         f"folders ({MIO_SEED_DIR}/, {MIO_SPEECH_DIR}/, {MIO_UNCLIP_DIR}/)")
    return specs, unclip


class MediaTokenizers:
    """A model's modality tokenizers, each built when first needed."""

    def __init__(self, specs: dict[str, SpecSource], unclip: Path | None = None,
                 problems: dict[str, str] | None = None) -> None:
        self.specs = specs
        self.unclip = unclip
        self.problems = problems or {}
        self._built: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike, tokenizers: str | os.PathLike | None = None,
                  unclip: str | os.PathLike | None = None) -> "MediaTokenizers":
        specs, problems = recorded_specs(Path(model_dir))
        found_unclip = None
        if tokenizers is not None:
            extra, found_unclip = specs_in_dir(Path(tokenizers))
            specs.update(extra)
            for kind in extra:
                problems.pop(kind, None)
        if VIDEO not in specs and IMAGE in specs:  # video is key frames through the image tokenizer
            specs[VIDEO] = SpecSource({"kind": "video", "image": specs[IMAGE].spec}, specs[IMAGE].origin)
        if unclip is not None:
            found_unclip = Path(unclip)
            if not (found_unclip / "model_index.json").is_file():
                raise FileNotFoundError(f"unCLIP folder {found_unclip} has no model_index.json (a diffusers "
                                        "StableUnCLIPImg2ImgPipeline folder is expected)")
        return cls(specs, found_unclip, problems)

    def why_missing(self, kind: str) -> str:
        if kind in self.problems:
            return self.problems[kind]
        return (f"no {kind} tokenizer is known for this model (its folder records none); pass --tokenizers DIR "
                f"with a {kind} spec or MIO's checkpoint tree")

    def has(self, kind: str) -> bool:
        return kind in self.specs

    def get(self, kind: str) -> Any:
        """The tokenizer of a modality (built once); MissingTokenizerError says how to provide one."""
        if kind not in self._built:
            if kind not in self.specs:
                raise MissingTokenizerError(self.why_missing(kind))
            from mio.tokenizers import build_tokenizer

            self._built[kind] = build_tokenizer(self.specs[kind].spec)
        return self._built[kind]

    def encode(self, item: MediaFile) -> Segment:
        """A prompt file -> its segment (speech keeps every layer; templates cut input speech to
        layer 1; a video's key frames follow its scenes, as for interleaved video)."""
        item.check()
        tokenizer = self.get(item.kind)
        if item.kind == IMAGE:
            return Image(np.asarray(tokenizer.encode([item.path])[0]))
        if item.kind == SPEECH:
            return Speech(np.asarray(tokenizer.encode_files([item.path])[0]))
        return Video(np.asarray(tokenizer.encode(item.path)))
