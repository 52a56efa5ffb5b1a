"""MediaTokenizers: the modality tokenizers one command uses, found, built on first use, and
used both ways (files -> codes; the tokenizers themselves, and the unCLIP folder found beside
them, for codes -> media).

Where the specs come from:

- `mio prepare`: the recipe's `tokenizers:` entries (or the same file names in `--tokenizers DIR`);
- `mio tokenize`: the one `--spec`;
- `mio generate`: what a model folder made by `mio fit` records (``mio_tokenizers.json``), then
  MIO's released checkpoint tree (``seed-tokenizer-2/``, ``SpeechTokenizer/``,
  ``stable-diffusion-2-1-unclip/``) inside the model folder (the release ships it there), each
  kind replaceable by ``--tokenizers DIR``. DIR may hold spec files (``*.yaml``), the checkpoint
  tree, or both. Prompt speech is not held to the pretraining length limit.

Built tokenizers are shared by every MediaTokenizers of the process with the same spec content
(the demo prepares seven recipes over the same specs; generation tests build many generators).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mio.media import read_image
from mio.segments import Image, Segment, Speech, Video
from mio.tokenizers.build import build_tokenizer
from mio.tokenizers.spec import load_spec
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, VIDEO

MODALITY_OF_SPEC_KIND = {"seed": IMAGE, "speechtokenizer": SPEECH, "video": VIDEO}
MODALITIES = tuple(MODALITY_OF_SPEC_KIND.values())

# MIO's released checkpoint tree (DESIGN.md, Checkpoints and real weights).
MIO_SEED_DIR, MIO_SPEECH_DIR, MIO_UNCLIP_DIR = "seed-tokenizer-2", "SpeechTokenizer", "stable-diffusion-2-1-unclip"

_BUILT: dict[str, Any] = {}  # spec identity -> tokenizer, for the whole process
_BUILD_LOCK = threading.Lock()  # prepare's media threads may ask for a tokenizer first


class MissingTokenizerError(MioUserError):
    """Media of a modality whose tokenizer is not known; the message says how to provide one."""


@dataclass
class SpecSource:
    """Where one modality's tokenizer comes from: a spec file or a parsed spec, and who said so."""

    spec: str | dict[str, Any]  # a path to a spec file, or the parsed spec
    origin: str  # for messages: which file or folder said so

    def parsed(self) -> dict[str, Any]:
        return load_spec(self.spec) if isinstance(self.spec, str) else self.spec

    def base_dir(self) -> Path:
        """The folder a spec's relative paths mean: its `root`, else its file's folder."""
        spec = self.parsed()
        if "root" in spec:
            return Path(os.path.expandvars(os.path.expanduser(str(spec["root"]))))
        return Path(self.spec).resolve().parent if isinstance(self.spec, str) else Path.cwd()

    def sha256(self) -> str | None:
        """The spec's content hash (None for a spec file that does not exist)."""
        if isinstance(self.spec, dict):
            return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()
        p = Path(self.spec)
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    def record(self) -> dict[str, Any]:
        """What a manifest records of the spec (and a model folder after training)."""
        return {"path": str(self.spec), "sha256": self.sha256()} if isinstance(self.spec, str) else {
            "content": self.spec, "sha256": self.sha256()}


@dataclass
class EncodedFile:
    """One media file's codes: image (32,), speech (layers, frames), video (frames, 32)."""

    kind: str
    codes: np.ndarray
    seconds: float | None = None  # speech: the clip's length after decoding
    frame_numbers: list[int] | None = None  # video: the key frames chosen

    def segment(self) -> Segment:
        """Speech keeps every layer (templates cut input speech to its content layer)."""
        return {IMAGE: Image, SPEECH: Speech, VIDEO: Video}[self.kind](self.codes)


class MediaTokenizers:
    """A command's modality tokenizers, each built when first needed (thread-safe)."""

    def __init__(self, specs: dict[str, SpecSource], unclip: Path | None = None,
                 problems: dict[str, str] | None = None, *, missing_hint: str | None = None,
                 local_rank: int = 0, limit_speech: bool = True) -> None:
        """``limit_speech``: refuse clips over the speech spec's ``max_seconds`` (a pretraining
        data filter); generation reads prompts of any length."""
        unknown = set(specs) - set(MODALITIES)
        if unknown:
            raise MioUserError(f"unknown media kinds {sorted(unknown)}; expected {MODALITIES}")
        self.specs = specs
        self.unclip = unclip
        self.problems = problems or {}
        self.missing_hint = missing_hint or ("no {kind} tokenizer is known for this model (its folder records none); "
                                             "pass --tokenizers DIR with a {kind} spec or MIO's checkpoint tree")
        self.local_rank = local_rank
        self.limit_speech = limit_speech

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str | os.PathLike) -> tuple["MediaTokenizers", str]:
        """One spec file (`mio tokenize`) -> the tokenizers and the modality it serves."""
        kind = MODALITY_OF_SPEC_KIND[load_spec(spec)["kind"]]
        return cls({kind: SpecSource(str(spec), str(spec))}), kind

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike, tokenizers: str | os.PathLike | None = None,
                  unclip: str | os.PathLike | None = None) -> "MediaTokenizers":
        """A model's tokenizers for generation: the specs its folder records (a folder `mio fit`
        wrote), then MIO's checkpoint folders inside it (the release's layout), then
        ``tokenizers`` (spec files or a checkpoint tree, per modality), then an ``unclip`` folder."""
        specs, problems = recorded_specs(Path(model_dir))
        own = release_tree(Path(model_dir))
        specs = {**own.specs, **specs}
        found_unclip, release = own.unclip, own.release
        if tokenizers is not None:
            extra = specs_in_dir(Path(tokenizers))
            specs.update(extra.specs)
            found_unclip, release = extra.unclip or found_unclip, release or extra.release
        for kind in specs:
            problems.pop(kind, None)
        if VIDEO not in specs and IMAGE in specs:  # video is key frames through the image tokenizer
            video: dict[str, Any] = {"kind": "video", "image": specs[IMAGE].spec}
            if release:  # MIO's model reads videos as its release cuts them
                video["selection"] = "mio-release"
            specs[VIDEO] = SpecSource(video, specs[IMAGE].origin)
        if unclip is not None:
            found_unclip = Path(unclip)
            if not (found_unclip / "model_index.json").is_file():
                raise FileNotFoundError(f"unCLIP folder {found_unclip} has no model_index.json (a diffusers "
                                        "StableUnCLIPImg2ImgPipeline folder is expected)")
        return cls(specs, found_unclip, problems, limit_speech=False, missing_hint=(
            "no {kind} tokenizer is known for this model (its folder records no spec and holds no "
            f"{MIO_SEED_DIR}/ or {MIO_SPEECH_DIR}/); pass --tokenizers DIR with a {{kind}} spec or MIO's checkpoint tree"))

    # --- lookup ----------------------------------------------------------------------------
    def why_missing(self, kind: str) -> str:
        return self.problems.get(kind) or self.missing_hint.format(kind=kind)

    def fingerprint(self) -> dict[str, str | None]:
        return {kind: self.specs[kind].sha256() for kind in sorted(self.specs)}

    def get(self, kind: str) -> Any:
        """The tokenizer of a modality (built once per process and spec content)."""
        if kind not in self.specs:
            raise MissingTokenizerError(self.why_missing(kind))
        source = self.specs[kind]
        key = json.dumps([source.spec if isinstance(source.spec, dict) else str(Path(source.spec).resolve()),
                          source.sha256()], sort_keys=True)
        with _BUILD_LOCK:
            if key not in _BUILT:
                _select_device(self.local_rank)
                _BUILT[key] = build_tokenizer(source.spec)
            return _BUILT[key]

    # --- files -> codes --------------------------------------------------------------------
    def encode_file(self, kind: str, path: str | os.PathLike) -> EncodedFile:
        """A media file -> its codes, decoded the way `mio prepare` decodes it (mio.media)."""
        p = Path(path)
        tok = self.get(kind)
        if kind == IMAGE:
            return EncodedFile(kind, np.asarray(tok.encode([read_image(p, str(p))])[0]))
        if kind == SPEECH:
            wave = tok.load_audio(p)  # (T,)
            codes = tok.encode([wave], names=[f"audio file {p}"], limit_length=self.limit_speech)[0]
            return EncodedFile(kind, np.asarray(codes), seconds=wave.shape[0] / tok.sample_rate)
        frame_numbers, frames = tok.key_frames(p, None)
        return EncodedFile(kind, np.asarray(tok.image.encode(frames)), frame_numbers=frame_numbers)


def recorded_specs(model_dir: Path) -> tuple[dict[str, SpecSource], dict[str, str]]:
    """The specs a model folder records -> (sources, reasons a recorded kind cannot be used)."""
    from mio.model.backbone import load_tokenizer_specs  # transformers: only generation pays for it

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


@dataclass
class Found:
    """Tokenizers found in a folder: specs by modality, the unCLIP pipeline folder, and whether
    any of it is MIO's released checkpoint tree."""

    specs: dict[str, SpecSource]
    unclip: Path | None = None
    release: bool = False


def release_tree(folder: Path) -> Found:
    """MIO's checkpoint folders in ``folder``: its release ships them inside the model repository.
    SEED's architecture is the release's (fixed in its code, not in a file): the spec's defaults."""
    specs: dict[str, SpecSource] = {}
    if (folder / MIO_SEED_DIR / "seed_quantizer.pt").is_file():
        specs[IMAGE] = SpecSource({"kind": "seed", "root": str(folder), "quantizer": f"{MIO_SEED_DIR}/seed_quantizer.pt",
                                   "vit": f"{MIO_SEED_DIR}/eva_vit_g.pth"}, str(folder / MIO_SEED_DIR))
    if (folder / MIO_SPEECH_DIR / "config.json").is_file():
        specs[SPEECH] = SpecSource({"kind": "speechtokenizer", "root": str(folder), "config": f"{MIO_SPEECH_DIR}/config.json",
                                    "checkpoint": f"{MIO_SPEECH_DIR}/SpeechTokenizer.pt"}, str(folder / MIO_SPEECH_DIR))
    unclip = folder / MIO_UNCLIP_DIR
    found_unclip = unclip if (unclip / "model_index.json").is_file() else None
    return Found(specs, found_unclip, release=bool(specs) or found_unclip is not None)


def specs_in_dir(folder: Path) -> Found:
    """Spec files (``*.yaml``) and MIO's checkpoint folders in a ``--tokenizers`` folder; a spec
    file wins over the checkpoint folder of its modality."""
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizers folder {folder} does not exist")
    tree = release_tree(folder)
    specs: dict[str, SpecSource] = {}
    for path in sorted(folder.glob("*.yaml")):
        kind = MODALITY_OF_SPEC_KIND[load_spec(path)["kind"]]
        if kind in specs:
            raise MioUserError(f"{folder} holds two {kind} tokenizer specs: {specs[kind].origin} and {path}")
        specs[kind] = SpecSource(str(path), str(path))
    if not specs and not tree.release:
        raise MioUserError(f"tokenizers folder {folder} holds neither tokenizer specs (*.yaml) nor MIO's checkpoint "
                         f"folders ({MIO_SEED_DIR}/, {MIO_SPEECH_DIR}/, {MIO_UNCLIP_DIR}/)")
    return Found({**tree.specs, **specs}, tree.unclip, tree.release)


def _select_device(local_rank: int) -> None:
    """Media tokenizers with `device: auto` use the current CUDA device: one GPU per local rank."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
