"""Data recipes: one YAML file says what to read, how its fields map, what to drop and how to
tokenize it (``data_recipes/*.yaml``). A user edits paths in a recipe, not code.

    data_type: image_text
    input: {format: tar, paths: "/data/cc3m/{00000..00331}.tar"}
    fields: {image: jpg, text: txt}
    tokenizers: {image: seed.yaml}
    filters: {min_image_side: 224, max_aspect_ratio: 2.0}
    shard_size: 1000
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mio.data.layouts import layout_of
from mio.templates import DATA_TYPES
from mio.userio import MioUserError, load_yaml_mapping
from mio.vocab import IMAGE, SPEECH, VIDEO

INPUT_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "folder", "tar", "urls",
                 "flickr30k_entities")  # a split list beside Sentences/ and Annotations/ (mio/data/layouts/grounding.py)
MEDIA_KINDS = (IMAGE, SPEECH, VIDEO)
BAD_MEDIA_POLICIES = ("drop_media", "drop_document")
JSONL_ARCHIVES = (".jsonl.zip", ".jsonl.tgz", ".jsonl.tar.gz")  # one JSONL file inside, as releases publish it


@dataclass
class Filters:
    """The paper's filters and the configurable rest.

    Image-text pairs: aspect ratio over ``max_aspect_ratio``:1 or shorter side below
    ``min_image_side`` px are dropped. Speech over ``max_speech_seconds`` is dropped (null:
    keep all). Samples with fewer than ``min_text_chars`` characters of text are dropped.
    ``languages``: keep only rows whose ``fields.language`` value is listed (empty: keep all).
    The pair filters judge the image's original size when the source records it
    (``fields.original_size``: img2dataset resizes and pads, and records the original).

    ``bad_media_in_document``: in an interleaved document (OBELICS, MMC4, video documents), a
    media item that cannot be used (dead link, missing or unreadable file) is dropped and counted
    by reason while the document keeps its text (``drop_media``), or drops the whole document
    (``drop_document``: with a fraction p of links alive, a document of k images survives with
    probability p^k). A document left without media and under ``min_text_chars`` is skipped.
    """

    min_image_side: int = 224
    max_aspect_ratio: float = 2.0
    max_speech_seconds: float | None = 15.0
    min_text_chars: int = 1
    languages: list[str] = field(default_factory=list)
    bad_media_in_document: str = "drop_media"


@dataclass
class InputSpec:
    """Where rows come from.

    ``paths``: files, glob or brace patterns, folders or URLs (relative ones resolve against
    the recipe's folder). ``format``: jsonl (also .jsonl.gz), json (one array of rows), csv, tsv,
    parquet, folder (files
    grouped by name stem, like WebDataset), tar (local tar shards or URLs WebDataset can open:
    http(s), pipe:, ...), urls (text files listing tar shard URLs, one a line). ``media_root``:
    the folder relative media paths in rows resolve against (default: each input file's folder).
    ``allow_missing``: a local input that does not exist is skipped, counted and listed in the
    manifest, instead of stopping the run (a partial download of a brace range).
    """

    paths: list[str]
    format: str = "auto"
    media_root: str | None = None
    allow_missing: bool = False

    @classmethod
    def parse(cls, raw: Any, where: str) -> "InputSpec":
        if isinstance(raw, (str, list)):
            raw = {"paths": raw}
        if not isinstance(raw, dict) or "paths" not in raw:
            raise MioUserError(f"recipe {where}: `input` must be a path, a list of paths or a mapping with `paths`")
        known = ("paths", "format", "media_root", "allow_missing")
        unknown = set(raw) - set(known)
        if unknown:
            raise MioUserError(f"recipe {where}: unknown input keys {sorted(unknown)}; known: {', '.join(known)}")
        paths = raw["paths"] if isinstance(raw["paths"], list) else [raw["paths"]]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise MioUserError(f"recipe {where}: input paths must be non-empty strings, got {raw['paths']!r}")
        if not isinstance(raw.get("allow_missing", False), bool):
            raise MioUserError(f"recipe {where}: input.allow_missing must be true or false, got {raw['allow_missing']!r}")
        spec = cls([str(p) for p in paths], str(raw.get("format", "auto")), raw.get("media_root"),
                   raw.get("allow_missing", False))
        if spec.format == "auto":
            spec.format = guess_format(paths[0], where)
        if spec.format not in INPUT_FORMATS:
            raise MioUserError(f"recipe {where}: input format must be one of {INPUT_FORMATS}, got {spec.format!r}")
        return spec


def guess_format(path: str, where: str) -> str:
    if path.lower().endswith(JSONL_ARCHIVES):  # MMC4, JourneyDB as published
        return "jsonl"
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv"),
                        (".parquet", "parquet"), (".tar", "tar"), (".txt", "urls")):
        if name.endswith(suffix):
            return fmt
    if name.endswith("/") or Path(os.path.expanduser(path)).is_dir():
        return "folder"
    raise MioUserError(f"recipe {where}: cannot tell the input format of {path!r}; set input.format "
                     f"to one of {INPUT_FORMATS}")


_SOURCE_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Recipe:
    data_type: str
    input: InputSpec
    fields: dict[str, str] = field(default_factory=dict)
    layout: str = "segments"
    tokenizers: dict[str, str] = field(default_factory=dict)
    filters: Filters = field(default_factory=Filters)
    image_first: bool = False  # llava layout: the image opens its turn, as LLaVA's training code puts it
    shard_size: int = 1000
    batch_size: int = 32
    workers: int = 4
    source: str = ""
    path: Path = Path(".")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        p = Path(path)
        raw = load_yaml_mapping(p, "recipe")
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = set(raw) - known
        if unknown:
            raise MioUserError(f"recipe {p}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        if raw.get("data_type") not in DATA_TYPES:
            raise MioUserError(f"recipe {p}: data_type must be one of {DATA_TYPES}, got {raw.get('data_type')!r}")
        if "input" not in raw:
            raise MioUserError(f"recipe {p}: `input` is required (the files or URLs to read)")
        try:
            filters = Filters(**(raw.pop("filters", None) or {}))
        except TypeError as e:
            raise MioUserError(f"recipe {p}: filters: {e} (known: {sorted(Filters.__dataclass_fields__)})") from None
        spec = InputSpec.parse(raw.pop("input"), str(p))
        source = _SOURCE_CHARS.sub("_", str(raw.pop("source", None) or p.stem))
        recipe = cls(**raw, input=spec, filters=filters, source=source, path=p.resolve())
        recipe.check(str(p))
        return recipe

    def check(self, where: str) -> None:
        for name, value, low in (("shard_size", self.shard_size, 1), ("batch_size", self.batch_size, 1),
                                 ("workers", self.workers, 1)):
            if not isinstance(value, int) or value < low:
                raise MioUserError(f"recipe {where}: {name} must be an integer >= {low}, got {value!r}")
        layout_of(self.layout, self.data_type, f"recipe {where}")
        bad = [k for k in self.tokenizers if k not in MEDIA_KINDS]
        if bad:
            raise MioUserError(f"recipe {where}: tokenizers has unknown kinds {bad}; known: {MEDIA_KINDS}")
        if not isinstance(self.fields, dict) or not all(isinstance(v, str) for v in self.fields.values()):
            raise MioUserError(f"recipe {where}: fields must map names to strings, got {self.fields!r}")
        if self.filters.bad_media_in_document not in BAD_MEDIA_POLICIES:
            raise MioUserError(f"recipe {where}: filters.bad_media_in_document must be one of {BAD_MEDIA_POLICIES}, "
                             f"got {self.filters.bad_media_in_document!r}")
        if "original_size" in self.fields and len(self.fields["original_size"].split(",")) != 2:
            raise MioUserError(f"recipe {where}: fields.original_size must name two fields, WIDTH,HEIGHT "
                             f"(e.g. json.original_width,json.original_height); got {self.fields['original_size']!r}")
        if self.image_first and self.layout != "llava":
            raise MioUserError(f"recipe {where}: image_first applies to layout llava only")
        if self.filters.languages and "language" not in self.fields:
            raise MioUserError(f"recipe {where}: filters.languages needs fields.language (the row's language field)")

    def resolve(self, relative: str) -> Path:
        return (self.path.parent / os.path.expanduser(relative)).resolve()

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The recipe as the manifest records it."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d
