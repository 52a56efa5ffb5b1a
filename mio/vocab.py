"""Token layout of the extended vocabulary, and the step that extends a backbone with it.

A backbone with text vocabulary V gets 6 special tokens and 8192 image + 4096 speech code
tokens. The layout is data, not code: one :class:`VocabTable`, saved as ``mio_vocab.json``
beside every model folder, maps ids <-> (modality, layer, code) both ways. The default is
MIO's released layout (DESIGN.md, Vocabulary).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mio.userio import MioUserError
from tokenizers import AddedToken

VOCAB_FILE = "mio_vocab.json"
FORMAT = "mio-vocab/1"

IMAGE_BEGIN, IMAGE_END = "<image>", "</image>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn markers (SFT, generation's stop)
CHAT_MARKERS = (CHAT_START, CHAT_END)
SPEECH_BEGIN, SPEECH_END = "<spch>", "</spch>"
BLOCK_MARKERS = (IMAGE_BEGIN, IMAGE_END, SPEECH_BEGIN, SPEECH_END)
# Our names for the two placeholder tokens; MIO's release states their ids, not their names, and
# nothing of mio needs them beyond keeping their ids out of the text vocabulary.
IMAGE_PLACEHOLDER, SPEECH_PLACEHOLDER = "<image_placeholder>", "<speech_placeholder>"

# MIO's released checkpoints fix these at V+0 .. V+5 in this order (DESIGN.md).
MIO_SPECIAL_ORDER = (SPEECH_PLACEHOLDER, SPEECH_END, IMAGE_PLACEHOLDER, SPEECH_BEGIN, IMAGE_END, IMAGE_BEGIN)
# The config.json fields of MIO's release that state where each special token is.
MIO_CONFIG_IDS = {"speech_placeholder_id": SPEECH_PLACEHOLDER, "speech_eos_id": SPEECH_END,
                  "image_placeholder_id": IMAGE_PLACEHOLDER, "speech_bos_id": SPEECH_BEGIN,
                  "image_eos_id": IMAGE_END, "image_bos_id": IMAGE_BEGIN}

# Modality names: one spelling and one meaning everywhere (segments, generation, metrics).
TEXT, IMAGE, VIDEO, SPEECH = "text", "image", "video", "speech"
# VocabTable.modality's per-token codes (int8 arrays behind per-modality losses and token
# shares; video frames are image tokens): code i is the modality TOKEN_MODALITIES[i].
TOKEN_MODALITIES = (TEXT, IMAGE, SPEECH)
TEXT_CODE, IMAGE_CODE, SPEECH_CODE = range(len(TOKEN_MODALITIES))
MODALITY_NAMES = dict(enumerate(TOKEN_MODALITIES))  # code -> name
# The label of a position nothing is trained to predict there (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

# Grounding (DESIGN.md, Grounding): a box is ``<box>`` + location tokens + ``</box>``; a phrase
# linked to it is ``<phrase>text</phrase>`` right before it (Kosmos-2's markdown-like form).
BOX_BEGIN, BOX_END, PHRASE_BEGIN, PHRASE_END = "<box>", "</box>", "<phrase>", "</phrase>"
BOX_MARKERS = (BOX_BEGIN, BOX_END, PHRASE_BEGIN, PHRASE_END)
# Location schemes: "bins" (Unified-IO 2 style: each coordinate quantized to one of B bins, a box
# is four tokens x1 y1 x2 y2) and "grid" (Kosmos-2 style: P x P cells numbered row-major, a box is
# two tokens, its top-left cell and its bottom-right cell).
LOCATION_SCHEMES = {"bins": 4, "grid": 2}  # scheme -> location tokens per box


@dataclass(frozen=True)
class LocationTokens:
    """A stage's location tokens (``model.location_tokens``): the scheme and its size, B bins per
    axis (``bins``) or P cells per side (``grid``). They come after MIO's layout, so MIO's ids stay."""

    scheme: str = "bins"
    size: int = 1000

    def __post_init__(self) -> None:
        if self.scheme not in LOCATION_SCHEMES:
            raise VocabError(f"location_tokens.scheme must be one of {sorted(LOCATION_SCHEMES)}, got {self.scheme!r}")
        if not isinstance(self.size, int) or self.size < 2:
            raise VocabError(f"location_tokens.size must be an integer >= 2, got {self.size!r}")

    @classmethod
    def of(cls, value: "LocationTokens | Mapping[str, Any] | None") -> "LocationTokens | None":
        """A stage setting as parsed (a mapping, or the dataclass itself) -> LocationTokens or None."""
        if value is None or isinstance(value, LocationTokens):
            return value
        return cls(**value)

    @property
    def count(self) -> int:
        """Location tokens in the vocabulary: B bins, or P*P cells."""
        return self.size if self.scheme == "bins" else self.size * self.size

    @property
    def per_box(self) -> int:
        return LOCATION_SCHEMES[self.scheme]

    def bins(self, values: np.ndarray) -> np.ndarray:
        """Normalized coordinates in [0, 1] -> their bin (or cell column/row) in [0, size)."""
        return np.minimum((np.asarray(values, dtype=np.float64) * self.size).astype(np.int64), self.size - 1)

    def encode(self, box: Sequence[float]) -> np.ndarray:
        """(x1, y1, x2, y2) normalized -> the box's location codes, (per_box,) int64: ``bins``:
        the bins of x1, y1, x2, y2 in that order; ``grid``: the cells ``row * size + column`` of
        the top-left corner (x1, y1) and of the bottom-right corner (x2, y2)."""
        q = self.bins(np.asarray(box, dtype=np.float64))  # (4,) x1 y1 x2 y2
        if self.scheme == "bins":
            return q
        return np.array([q[1] * self.size + q[0], q[3] * self.size + q[2]], dtype=np.int64)

    def decode(self, codes: Sequence[int]) -> tuple[float, float, float, float]:
        """Location codes -> (x1, y1, x2, y2), each the centre of its bin (or cell): within half a
        bin of what :meth:`encode` was given."""
        c = np.asarray(codes, dtype=np.int64)
        if c.shape != (self.per_box,) or c.min() < 0 or c.max() >= self.count:
            raise VocabError(f"a {self.scheme} box needs {self.per_box} location codes in [0, {self.count}), got "
                             f"{c.tolist()}")
        q = c if self.scheme == "bins" else np.array([c[0] % self.size, c[0] // self.size,
                                                        c[1] % self.size, c[1] // self.size])
        x1, y1, x2, y2 = ((q + 0.5) / self.size).tolist()
        return x1, y1, x2, y2

    def bound(self, codes: Sequence[int]) -> int | None:
        """The code that bounds the next one after a box's first ``len(codes)`` codes (None: any
        code may come): ``bins``: x2 is bounded by x1, y2 by y1; ``grid``: the bottom-right cell by
        the top-left one."""
        n = len(codes)
        if self.scheme == "bins":
            return int(codes[n - 2]) if n >= 2 else None
        return int(codes[0]) if n == 1 else None

    def allowed_from(self, bound: int) -> np.ndarray:
        """(count,) bool: the codes allowed after ``bound`` (see :meth:`bound`), so that x2 >= x1 and
        y2 >= y1: every box completed under them decodes valid."""
        codes = np.arange(self.count)
        if self.scheme == "bins":
            return codes >= bound
        return (codes % self.size >= bound % self.size) & (codes // self.size >= bound // self.size)


class VocabError(MioUserError):
    """A token id, code or layout that does not fit the vocabulary table."""


@dataclass(frozen=True)
class VocabTable:
    """Where the added tokens live in the extended vocabulary.

    Image code ``c`` is token ``image_start + c``; speech layer ``k`` code ``c`` is token
    ``speech_start + k * speech_codebook_size + c`` (MIO's ``<spch{k*1024+c}>``).
    """

    text_size: int
    specials: dict[str, int]
    image_start: int
    speech_start: int
    image_codebook_size: int = 8192
    speech_codebook_size: int = 1024
    speech_layers: int = 4
    image_token: str = "<img{}>"
    speech_token: str = "<spch{}>"
    format: str = field(default=FORMAT)
    # Location tokens (off by default): the scheme, its size and the first token's id; the four
    # BOX_MARKERS are then in ``specials``.
    location_scheme: str | None = None
    location_size: int = 0
    location_start: int = -1
    location_token: str = "<loc{}>"

    def __post_init__(self) -> None:
        missing = [t for t in BLOCK_MARKERS if t not in self.specials]
        if missing:
            raise VocabError(f"vocabulary table lacks the block markers {missing}")
        if self.location_scheme is not None:
            LocationTokens(self.location_scheme, self.location_size)  # checks them
            missing = [t for t in BOX_MARKERS if t not in self.specials]
            if missing:
                raise VocabError(f"vocabulary table has location tokens but lacks the box markers {missing}")
        ranges = [(i, i + 1, t) for t, i in self.specials.items()]
        ranges += [(self.image_start, self.image_end_id, "image codes"),
                   (self.speech_start, self.speech_end_id, "speech codes")]
        if self.location_scheme is not None:
            ranges.append((self.location_start, self.location_end_id, "location tokens"))
        ranges.sort()
        if ranges[0][0] < self.text_size:
            raise VocabError(f"added token {ranges[0][2]!r} at id {ranges[0][0]} overlaps the text vocabulary "
                             f"(size {self.text_size})")
        for (_, a1, an), (b0, _, bn) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise VocabError(f"{an!r} and {bn!r} overlap in the vocabulary table")

    # --- construction -------------------------------------------------------------------
    @classmethod
    def mio_default(cls, text_size: int, image_codebook_size: int = 8192,
                    speech_codebook_size: int = 1024, speech_layers: int = 4,
                    locations: LocationTokens | None = None) -> "VocabTable":
        """MIO's layout: specials at V..V+5, then image codes, then speech codes; with
        ``locations``, then the four box markers and the location tokens."""
        specials = {tok: text_size + i for i, tok in enumerate(MIO_SPECIAL_ORDER)}
        image_start = text_size + len(MIO_SPECIAL_ORDER)
        table = cls(text_size=text_size, specials=specials, image_start=image_start,
                    speech_start=image_start + image_codebook_size,
                    image_codebook_size=image_codebook_size,
                    speech_codebook_size=speech_codebook_size, speech_layers=speech_layers)
        return table.with_locations(locations) if locations is not None else table

    def with_locations(self, locations: LocationTokens) -> "VocabTable":
        """This table with box markers and location tokens after its last id (its ids stay)."""
        if self.location_scheme is not None:
            raise VocabError("the vocabulary table has location tokens already")
        end = self.total_size
        specials = {**self.specials, **{t: end + i for i, t in enumerate(BOX_MARKERS)}}
        return replace(self, specials=specials, location_scheme=locations.scheme, location_size=locations.size,
                       location_start=end + len(BOX_MARKERS))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: Mapping[str, Any] | None = None) -> "VocabTable":
        """The table of an extended tokenizer that ships no table file (MIO's release).

        The special tokens' ids come from ``config`` (a model's config.json) where it states
        them, as MIO's does (``text_vocab_size``, ``speech_bos_id``, ...); else from the
        tokenizer's block markers (``<image>``, ``</image>``, ``<spch>``, ``</spch>``). The code
        tokens are the tokenizer's ``<img{i}>`` and ``<spch{c + 1024*k}>`` runs.
        """
        vocab: dict[str, int] = tokenizer.get_vocab()
        if config is not None and all(k in config for k in (*MIO_CONFIG_IDS, "text_vocab_size")):
            specials, text_size = _specials_from_config(config, tokenizer, vocab)
        else:
            missing = [t for t in BLOCK_MARKERS if t not in vocab]
            if missing:
                raise VocabError(f"tokenizer has no {missing} tokens and the model's config states no special token "
                                 "ids: it was not extended for mio/MIO")
            specials = {t: vocab[t] for t in MIO_SPECIAL_ORDER if t in vocab}
            text_size = min(specials.values())
        img = _code_run(vocab, r"<img(\d+)>", "image")
        spc = _code_run(vocab, r"<spch(\d+)>", "speech")
        speech_layers = 4 if len(spc) % 4 == 0 else 1  # MIO's 4 RVQ layers of one codebook size each
        return cls(text_size=text_size, specials=specials, image_start=img[0], speech_start=spc[0],
                   image_codebook_size=len(img), speech_codebook_size=len(spc) // speech_layers,
                   speech_layers=speech_layers)

    # --- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / VOCAB_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "VocabTable":
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no vocabulary table (a folder made by `mio fit` has one)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise VocabError(f"{path}: unknown vocabulary table format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(**data)

    # --- sizes and named ids ------------------------------------------------------------
    @property
    def image_end_id(self) -> int:
        return self.image_start + self.image_codebook_size

    @property
    def speech_end_id(self) -> int:
        return self.speech_start + self.speech_codebook_size * self.speech_layers

    @property
    def location_end_id(self) -> int:
        return self.location_start + self.locations.count if self.location_scheme is not None else self.location_start

    @property
    def locations(self) -> LocationTokens:
        """The table's location tokens; a table without them raises, saying what to do."""
        if self.location_scheme is None:
            raise VocabError("this model's vocabulary has no location tokens, so it cannot read or write boxes: "
                             "train it from a stage that extends the backbone with model.location_tokens "
                             "(e.g. {scheme: bins, size: 1000})")
        return LocationTokens(self.location_scheme, self.location_size)

    @property
    def has_locations(self) -> bool:
        return self.location_scheme is not None

    def is_location(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if self.location_scheme is None:
            return np.zeros(ids.shape, dtype=bool)
        return (ids >= self.location_start) & (ids < self.location_end_id)

    @property
    def total_size(self) -> int:
        return max(self.image_end_id, self.speech_end_id, self.location_end_id, max(self.specials.values()) + 1)

    @property
    def num_added(self) -> int:
        return self.total_size - self.text_size

    @property
    def image_begin(self) -> int:
        return self.specials[IMAGE_BEGIN]

    @property
    def image_end(self) -> int:
        return self.specials[IMAGE_END]

    @property
    def speech_begin(self) -> int:
        return self.specials[SPEECH_BEGIN]

    @property
    def speech_end(self) -> int:
        return self.specials[SPEECH_END]

    def added_tokens(self) -> list[str]:
        """Every added token's string, in id order (ids text_size .. total_size-1)."""
        tokens: list[str | None] = [None] * self.num_added
        for tok, i in self.specials.items():
            tokens[i - self.text_size] = tok
        for c in range(self.image_codebook_size):
            tokens[self.image_start + c - self.text_size] = self.image_token.format(c)
        for c in range(self.speech_codebook_size * self.speech_layers):
            tokens[self.speech_start + c - self.text_size] = self.speech_token.format(c)
        if self.location_scheme is not None:
            for c in range(self.locations.count):
                tokens[self.location_start + c - self.text_size] = self.location_token.format(c)
        holes = [i + self.text_size for i, t in enumerate(tokens) if t is None]
        if holes:
            raise VocabError(f"vocabulary table leaves ids {holes[:5]} unassigned")
        return tokens  # type: ignore[return-value]

    # --- codes <-> ids (vectorised) ------------------------------------------------------
    def image_ids(self, codes: np.ndarray, where: str = "image") -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        _check_range(codes, self.image_codebook_size, f"{where}: image code")
        return codes + self.image_start

    def image_codes(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not np.all(self.is_image(ids)):
            raise VocabError(f"ids {ids[~self.is_image(ids)][:5].tolist()} are not image code tokens")
        return ids - self.image_start

    def speech_ids(self, codes: np.ndarray, where: str = "speech") -> np.ndarray:
        """(L, T) codes of layers 0..L-1 -> (L, T) token ids."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or not 1 <= codes.shape[0] <= self.speech_layers:
            raise VocabError(f"{where}: speech codes must be (layers<= {self.speech_layers}, frames), got shape {codes.shape}")
        _check_range(codes, self.speech_codebook_size, f"{where}: speech code")
        layer_offset = np.arange(codes.shape[0], dtype=np.int64)[:, None] * self.speech_codebook_size
        return codes + layer_offset + self.speech_start

    def speech_codes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids -> (layer, code) arrays."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and not np.all(self.is_speech(ids)):
            raise VocabError(f"ids {ids[~self.is_speech(ids)][:5].tolist()} are not speech code tokens")
        rel = ids - self.speech_start
        return rel // self.speech_codebook_size, rel % self.speech_codebook_size

    def is_image(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.image_start) & (ids < self.image_end_id)

    def is_speech(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.speech_start) & (ids < self.speech_end_id)

    def modality(self, ids: np.ndarray) -> np.ndarray:
        """Per-token modality codes (TEXT_CODE, IMAGE_CODE or SPEECH_CODE) as int8; specials count as text."""
        ids = np.asarray(ids)
        out = np.full(ids.shape, TEXT_CODE, dtype=np.int8)
        out[self.is_image(ids)] = IMAGE_CODE
        out[self.is_speech(ids)] = SPEECH_CODE
        return out

    def describe(self, token_id: int) -> tuple[str, int, int]:
        """One id -> (modality, layer, code); text and special ids give layer 0, code = id."""
        if not 0 <= token_id < self.total_size:
            raise VocabError(f"token id {token_id} is outside the vocabulary (size {self.total_size})")
        if self.is_image(token_id):
            return IMAGE, 0, token_id - self.image_start
        if self.is_speech(token_id):
            layer, code = self.speech_codes(np.array([token_id]))
            return SPEECH, int(layer[0]), int(code[0])
        if self.is_location(token_id):
            return "location", 0, token_id - self.location_start
        if token_id in self.specials.values():
            return "special", 0, token_id
        return TEXT, 0, token_id


def _check_range(codes: np.ndarray, size: int, what: str) -> None:
    if codes.size and (codes.min() < 0 or codes.max() >= size):
        bad = codes[(codes < 0) | (codes >= size)]
        raise VocabError(f"{what} {int(bad.flat[0])} is outside its codebook [0, {size})")


def _code_run(vocab: Mapping[str, int], pattern: str, name: str) -> list[int]:
    """The ids of a tokenizer's code tokens in code order; they must be one contiguous run."""
    found = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := re.fullmatch(pattern, t)))
    if not found:
        raise VocabError(f"tokenizer has no {name} code tokens")
    codes, ids = zip(*found)
    if codes != tuple(range(len(codes))) or ids != tuple(range(ids[0], ids[0] + len(ids))):
        raise VocabError(f"{name} code tokens are not one contiguous run of ids in code order")
    return list(ids)


def _specials_from_config(config: Mapping[str, Any], tokenizer: Any, vocab: Mapping[str, int]) -> tuple[dict[str, int], int]:
    """MIO's config.json fields -> ({token: id} of the 6 specials, text vocabulary size).

    The placeholders keep whatever names the tokenizer gives their ids (the release does not
    say them); a block marker the tokenizer knows must sit where the config says.
    """
    specials: dict[str, int] = {}
    for field_name, ours in MIO_CONFIG_IDS.items():
        i = int(config[field_name])
        if ours in BLOCK_MARKERS:
            if ours in vocab and vocab[ours] != i:
                raise VocabError(f"config.json says {field_name} {i}, but the tokenizer has {ours} at id {vocab[ours]}")
            specials[ours] = i
        else:
            name = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
            specials[name if isinstance(name, str) and name not in specials else ours] = i
    text_size = int(config["text_vocab_size"])
    declared = config.get("num_new_special_tokens")
    if declared is not None and int(declared) != len(set(specials.values())):
        raise VocabError(f"config.json declares {declared} new special tokens but states the ids of "
                         f"{len(set(specials.values()))}")
    return specials, text_size


def chat_end_id(tokenizer: Any) -> int | None:
    """ChatML's turn end as one token, or None where the tokenizer does not have it."""
    end = tokenizer.convert_tokens_to_ids(CHAT_END)
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else None


def stop_ids(tokenizer: Any, eos: int | list[int] | None = None) -> list[int]:
    """Where an answer may end, sorted: ``eos`` (a generation config's EOS ids), the tokenizer's
    EOS, and ChatML's turn end, where an assistant turn ends (MIO's release stops on it, id 7,
    outside its generation config)."""
    ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    ids += [i for i in (tokenizer.eos_token_id, chat_end_id(tokenizer)) if i is not None]
    return sorted({int(i) for i in ids})


def missing_chat_markers(tokenizer: Any) -> list[str]:
    """ChatML's markers the tokenizer lacks (Llama 2, Mistral, Gemma, GPT-2... have none; Yi, Qwen have both)."""
    vocab = tokenizer.get_vocab()
    return [t for t in CHAT_MARKERS if t not in vocab]


def extension_table(tokenizer: Any, locations: LocationTokens | None = None) -> VocabTable:
    """The table that extending a text-only backbone with this tokenizer gives (extend_backbone): mio's
    tokens after the text vocabulary, which first gains the chat markers it lacks (then, with
    ``locations``, the box markers and location tokens)."""
    return VocabTable.mio_default(len(tokenizer) + len(missing_chat_markers(tokenizer)), locations=locations)


def is_extended(tokenizer: Any) -> bool:
    """Whether a tokenizer already has mio's (or MIO's) code tokens. (Block markers alone do not
    tell: some multimodal tokenizers have an ``<image>`` token of their own.)"""
    vocab = tokenizer.get_vocab()
    return "<img0>" in vocab or "<spch0>" in vocab


def folder_table(folder: str | os.PathLike, tokenizer: Any, extend: bool = False,
                 locations: LocationTokens | None = None) -> VocabTable:
    """The vocabulary table of a model folder: the one rule every command uses.

    1. the folder's ``mio_vocab.json`` (every folder mio writes has one);
    2. an extended tokenizer (MIO's release): :meth:`VocabTable.from_tokenizer`, with the ids
       the folder's ``config.json`` states;
    3. a text-only backbone: with ``extend`` (a stage with ``model.extend_vocab: true``), the
       table extending it will give; without, an error saying what to do.
    """
    path = Path(folder)
    if (path / VOCAB_FILE).is_file():
        return VocabTable.load(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    if is_extended(tokenizer) or (config is not None and "image_bos_id" in config):
        return VocabTable.from_tokenizer(tokenizer, config)
    if extend:
        return extension_table(tokenizer, locations)
    raise VocabError(f"{path} is not extended with mio's tokens (no {VOCAB_FILE}, no <img0>/<spch0> tokens): set "
                     "model.extend_vocab: true to extend it (stage 1), or start from a stage's output folder")


def extend_tokenizer(tokenizer: Any, table: VocabTable | None = None) -> VocabTable:
    """Add mio's tokens to a text tokenizer, in place (``extend_backbone`` without the model).

    A tokenizer without ChatML's ``<|im_start|>`` / ``<|im_end|>`` first gets them as added special
    tokens (one id each, right after its vocabulary), so SFT renders each as one token and
    generation can stop at ``<|im_end|>``; a tokenizer that has them keeps their ids.
    """
    if is_extended(tokenizer):
        raise VocabError("tokenizer already has mio's code tokens (<img0>, <spch0>): this backbone was extended before")
    table = table or extension_table(tokenizer)
    markers = missing_chat_markers(tokenizer)
    if markers:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in markers], special_tokens=True)
    if table.text_size != len(tokenizer):
        raise VocabError(f"vocabulary table starts at {table.text_size}, tokenizer has {len(tokenizer)} tokens")
    added = tokenizer.add_tokens(table.added_tokens())
    if added != table.num_added:
        raise VocabError(f"tokenizer added {added} of {table.num_added} tokens (some already existed)")
    probe = [IMAGE_BEGIN, table.image_token.format(0), table.speech_token.format(0)]
    got = tokenizer.convert_tokens_to_ids(probe)
    want = [table.image_begin, table.image_start, table.speech_start]
    if got != want:
        raise VocabError(f"tokenizer placed {probe} at {got}, the table says {want}")
    return table



def extend_backbone(model: Any, tokenizer: Any, table: VocabTable | None = None,
                    locations: LocationTokens | None = None) -> VocabTable:
    """Add mio's tokens to a Hugging Face causal LM and its tokenizer, in place.

    New embedding rows (and output rows, when untied) start at the mean of the existing
    rows, through transformers' own ``mean_resizing``.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        raise VocabError(
            f"tokenizer has {len(tokenizer)} tokens but the model has {rows} embedding rows; mio extends both in "
            "step, so they must agree: if the rows past the tokenizer's ids are padding (some families round their "
            "vocabulary up), resize the model to the tokenizer first (model.resize_token_embeddings(len(tokenizer)))")
    table = extend_tokenizer(tokenizer, table or extension_table(tokenizer, locations))
    # A model on the meta device (built before sharding) has no rows to average.
    model.resize_token_embeddings(table.total_size, mean_resizing=not model.get_input_embeddings().weight.is_meta)
    return table
