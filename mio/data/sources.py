"""Recipe inputs -> rows -> drafts (segments with media still as references).

An input is a sorted list of *parts* (files, folders or tar URLs); each part yields rows in a
fixed order, so "row r of part p" names the same row on every run and every rank. Parsing a
row is deferred (``Row.fields()``): a rank skips rows it does not own without parsing them.
Every failure of a row is a :class:`SkipSample` with a stable reason name.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import braceexpand

from mio.data.recipe import Recipe
from mio.data.tars import ShardFailure, shard_samples
from mio.segments import Text
from mio.vocab import IMAGE, SPEECH, VIDEO


class SkipSample(Exception):
    """A row dropped with a counted reason (``reason`` is the manifest's key)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Part:
    index: int
    name: str  # as the manifest and error messages show it
    locator: str  # local path or URL
    format: str
    media_base: Path | None  # relative media paths in rows resolve here
    missing: bool = False  # a local input that does not exist (kept only under input.allow_missing)

    def stat(self) -> list[int] | None:
        """(size, mtime_ns) of a local file part: a rerun refuses to mix shards of a changed input."""
        p = Path(self.locator)
        if self.format == "folder" or not p.is_file():
            return None
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    def size(self) -> int | None:
        """Bytes of a local file part (progress weighs parts by it); None for URLs and folders."""
        p = Path(self.locator)
        return p.stat().st_size if self.format != "folder" and p.is_file() else None


@dataclass
class Row:
    where: str  # "file.jsonl:12", "shard.tar:key", ...
    parse: Callable[[], dict[str, Any]]  # raises SkipSample
    base: Path | None
    read: float | None = None  # the fraction of its part read so far (progress), when the reader knows it
    input_failure: bool = False  # the reader's own failure (missing input, input that broke off): retried on rerun

    def fields(self) -> dict[str, Any]:
        return self.parse()


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def list_parts(recipe: Recipe) -> list[Part]:
    """The input's parts in a fixed order (each pattern expanded and sorted, in recipe order).

    A local input that does not exist (a name of a brace range, a glob matching nothing, a path
    in a URL list) stops the run with an error naming it, unless ``input.allow_missing`` is set:
    then it stays a part that yields one counted ``missing_file`` row."""
    spec = recipe.input
    where = f"recipe {recipe.path}"
    locators: list[str] = []
    missing: list[str] = []
    for pattern in spec.paths:
        if _is_url(pattern):
            locators += list(braceexpand.braceexpand(pattern))
            continue
        for expanded in braceexpand.braceexpand(os.path.expanduser(pattern)):
            full = str(recipe.resolve(expanded))
            found = sorted(glob.glob(full)) if glob.has_magic(full) else [full] if os.path.exists(full) else []
            locators += found or [full]
            missing += [] if found else [full]
    fmt = spec.format
    if fmt == "urls":
        present = [f for f in locators if f not in missing]
        urls, absent = _read_url_lists(present, where)
        locators, fmt = urls + [m for m in missing], "tar"
        missing += absent
    if missing and not spec.allow_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(locators)} inputs are missing: {shown}. Fetch them or fix `input.paths`; "
            f"or set `input.allow_missing: true` to skip them (each is then counted and listed in the manifest)")
    media_root = recipe.resolve(spec.media_root) if spec.media_root else None
    if media_root is not None and not media_root.is_dir():
        raise FileNotFoundError(f"{where}: input.media_root {media_root} is not a folder (relative media paths of "
                                f"the rows start there)")
    parts = []
    for i, loc in enumerate(locators):
        if fmt == "folder" and loc not in missing and not os.path.isdir(loc):
            raise ValueError(f"{where}: input format is folder, but {loc} is not a folder")
        base = media_root or (None if _is_url(loc) else (Path(loc) if fmt == "folder" else Path(loc).parent))
        rel = loc if _is_url(loc) else os.path.relpath(loc, recipe.path.parent)
        name = loc if rel.startswith("..") else rel  # beside the recipe: short; elsewhere: absolute
        parts.append(Part(i, name, loc, fmt, base, missing=loc in missing))
    return parts


def _read_url_lists(files: list[str], where: str) -> tuple[list[str], list[str]]:
    """The shards that URL list files name -> (every shard, the local ones that do not exist)."""
    urls: list[str] = []
    absent: list[str] = []
    for f in files:
        for line in Path(f).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if _is_url(line):
                found = list(braceexpand.braceexpand(line))
                absent += [u for u in found if u.startswith("file://") and not os.path.exists(u[len("file://"):])]
            else:
                found = [str((Path(f).parent / p).resolve()) for p in braceexpand.braceexpand(line)]
                absent += [p for p in found if not os.path.exists(p)]
            urls += found
    if files and not urls:
        raise ValueError(f"{where}: the URL list(s) {files} name no shard")
    return urls, absent


# --- rows per format ----------------------------------------------------------------------
def iter_rows(part: Part) -> Iterator[Row]:
    if part.missing:
        detail = f"{part.name}: input file is missing (skipped: input.allow_missing is set)"
        return iter([Row(f"{part.name}:start", lambda: _raise("missing_file", detail), part.media_base,
                         input_failure=True)])
    readers = {"jsonl": _jsonl_rows, "json": _json_array_rows, "csv": _csv_rows, "tsv": _csv_rows,
               "parquet": _parquet_rows, "folder": _folder_rows, "tar": _tar_rows}
    return readers[part.format](part)


def _parse_json_line(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("not_utf8", f"{where}: line is not UTF-8 ({e})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise SkipSample("bad_json", f"{where}: line is not JSON ({e})") from None
    if not isinstance(row, dict):
        raise SkipSample("bad_json", f"{where}: line is JSON but not an object ({type(row).__name__})")
    return row


def _jsonl_rows(part: Part) -> Iterator[Row]:
    """JSON lines: plain, .gz, and as releases publish them, one .jsonl inside a .zip (MMC4) or a
    .tgz / .tar.gz (JourneyDB). A truncated or corrupt compressed file keeps the rows read
    before the damage and ends with one counted ``truncated_input`` row."""
    size = os.path.getsize(part.locator)
    lineno = 0
    try:
        with open(part.locator, "rb") as raw:
            for member, lines in _jsonl_members(part.locator, raw):
                prefix = f"{part.name}:{member}" if member else part.name
                for lineno, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    where = f"{prefix}:{lineno}"
                    yield Row(where, lambda line=line, where=where: _parse_json_line(line, where), part.media_base,
                              read=raw.tell() / max(size, 1))
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        where, detail = f"{part.name}:end", f"{part.name}: input ends early after line {lineno} ({e})"
        yield Row(where, lambda: _raise("truncated_input", detail), part.media_base, input_failure=True)


JSONL_MEMBERS = (".jsonl", ".jsonl.gz")


def _jsonl_members(locator: str, raw: IO[bytes]) -> Iterator[tuple[str | None, IO[bytes]]]:
    """(member name or None, a binary file of its lines) for each JSON-lines file that a
    (compressed) input holds; an archive's other members (a README) are not rows."""
    name = locator.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(raw) as zf:
            for member in sorted(n for n in zf.namelist() if n.endswith(JSONL_MEMBERS)):
                with zf.open(member) as fh:
                    yield member, gzip.GzipFile(fileobj=fh) if member.endswith(".gz") else fh
    elif name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for info in tar:
                fh = tar.extractfile(info) if info.isreg() and info.name.endswith(JSONL_MEMBERS) else None
                if fh is not None:
                    yield info.name, fh
    elif name.endswith(".gz"):
        yield None, gzip.GzipFile(fileobj=raw)
    else:
        yield None, raw


def _json_array_rows(part: Part) -> Iterator[Row]:
    """A JSON file holding one array of row objects (LLaVA-Instruct and similar releases)."""
    opener = gzip.open if part.locator.endswith(".gz") else open
    with opener(part.locator, "rb") as fh:
        try:
            rows = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{part.name}: not a JSON array of rows ({e}); use format jsonl for one object "
                             f"a line") from None
    if not isinstance(rows, list):
        raise ValueError(f"{part.name}: a json input must hold an array of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        where = f"{part.name}:[{i}]"
        yield Row(where, lambda row=row, where=where: row if isinstance(row, dict) else
                  _raise("bad_json", f"{where}: row is not an object"), part.media_base, read=(i + 1) / len(rows))


def _raise(reason: str, detail: str) -> dict[str, Any]:
    raise SkipSample(reason, detail)


def _csv_rows(part: Part) -> Iterator[Row]:
    delimiter = "\t" if part.format == "tsv" else ","
    size = os.path.getsize(part.locator)
    with open(part.locator, "rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if part.locator.endswith(".gz") else raw
        fh = io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(fh, delimiter=delimiter)
        for row in reader:
            where = f"{part.name}:{reader.line_num}"
            yield Row(where, lambda row=row, where=where: _checked_csv_row(row, where), part.media_base,
                      read=raw.tell() / max(size, 1))


def _checked_csv_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    for k, v in row.items():
        if k is None:
            raise SkipSample("bad_row", f"{where}: more values than header columns")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise SkipSample("not_utf8", f"{where}: column {k!r} is not UTF-8") from None
    return dict(row)


def _parquet_rows(part: Part) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(part.locator)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise ValueError(f"{part.name}: not a readable parquet file: {e}") from None
    index, total = 0, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            where = f"{part.name}:row {index}"
            index += 1
            yield Row(where, lambda row=row: row, part.media_base, read=index / total)


def _key_and_ext(name: str) -> tuple[str, str] | None:
    """WebDataset's convention: key = path up to the first dot of the basename."""
    folder, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _folder_rows(part: Part) -> Iterator[Row]:
    root = Path(part.locator)
    groups: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            ke = _key_and_ext(rel)
            if ke is not None:
                groups.setdefault(ke[0], {})[ke[1]] = root / rel
    for i, key in enumerate(sorted(groups)):
        members = groups[key]
        where = f"{part.name}/{key}"
        yield Row(where, lambda members=members: dict(members), part.media_base, read=(i + 1) / len(groups))


def _tar_rows(part: Part) -> Iterator[Row]:
    """Samples of a tar shard (a local file, ``http(s)://``, ``pipe:``, ...) read through mio's one
    tar stage. A shard that fails keeps the samples before the failure and ends with one counted
    row naming the URL and the error: ``missing_file`` when nothing could be read (a missing file,
    an HTTP 404, a command that failed at once), ``truncated_input`` when it broke off."""
    failures: list[ShardFailure] = []
    for sample in shard_samples(part.locator, on_failure=failures.append):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        yield Row(f"{part.name}:{sample['__key__']}", lambda members=members: members, part.media_base)
    for f in failures:
        if f.reason == "unreadable":
            reason, where, what = "missing_file", f"{part.name}:start", "could not be read"
        else:
            reason, where, what = "truncated_input", f"{part.name}:end", f"broke off after {f.members} members"
        detail = f"{part.name}: input shard {what} ({f.error}); the {f.samples} samples before it are kept"
        yield Row(where, lambda reason=reason, detail=detail: _raise(reason, detail), part.media_base,
                  input_failure=True)


# --- field lookup ---------------------------------------------------------------------------
def _parse_member_json(value: Any, where: str) -> Any:
    data = value.read_bytes() if isinstance(value, Path) else value
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", f"{where}: json member does not parse ({e})") from None


def _walk(value: Any, parts: list[str], where: str) -> Any:
    for i, name in enumerate(parts):
        if isinstance(value, (bytes, Path)):
            value = _parse_member_json(value, where)
        if isinstance(value, dict) and name in value:
            value = value[name]
        elif isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        else:
            return None
    return value


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


def lookup(values: dict[str, Any], spec: str, where: str, required: bool = True) -> Any:
    """A field of a row: ``a.b.0`` walks nested JSON (and json members of tar/folder rows);
    ``{a}/{b}.mp4`` formats from top-level fields; ``x;y`` takes the first present. A required
    field that matches nothing is a ``missing_field`` skip that lists the keys the row has."""
    for alt in spec.split(";"):
        if "{" in alt:
            try:
                return alt.format_map(_Missing(values))
            except (KeyError, IndexError, ValueError):
                continue
        value = values.get(alt) if alt in values else _walk(values, alt.split("."), where)
        if value is not None:
            return value
    if required:
        raise SkipSample("missing_field", f"{where}: row has no field {spec!r}; {_keys_of(values, spec, where)} "
                                          f"(set `fields` in the recipe to the row's names)")
    return None


def _keys_of(values: dict[str, Any], spec: str, where: str) -> str:
    """The keys of the row, or of the deepest object its first alternative's path reaches."""
    first = spec.split(";")[0]
    names = [] if "{" in first else first.split(".")
    path: list[str] = []
    value: Any = values
    for i in range(len(names) - 1, 0, -1):  # the longest prefix that resolves
        found = _walk(values, names[:i], where)
        if found is not None:
            path, value = names[:i], found
            break
    if isinstance(value, (bytes, Path)):
        try:
            value = _parse_member_json(value, where)
        except SkipSample:
            return f"{'.'.join(path)} is not JSON"
    if not isinstance(value, dict):
        return f"{'.'.join(path)} is a {type(value).__name__}, not an object"
    keys = sorted(map(str, value))
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
    return f"{'.'.join(path) + ' has' if path else 'its'} keys: {shown or '(none)'}"


def as_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, Path):
        value = value.read_bytes()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("not_utf8", f"{where}: {name} is not UTF-8 ({e})") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipSample("not_utf8", f"{where}: {name} is not UTF-8") from None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SkipSample("bad_field", f"{where}: {name} must be text, got {type(value).__name__}")


@dataclass
class MediaRef:
    """A media item of a row, not yet loaded: a file, or the bytes of a tar member."""

    kind: str  # image | speech | video
    name: str  # for messages: the file path or "shard.tar:key.ext"
    path: Path | None = None
    data: bytes | None = None
    text: str | None = None  # the paired text (a video tokenizer may choose its key frames by it)
    start: float | None = None  # seconds into the recording (long-form speech, e.g. Libriheavy)
    duration: float | None = None
    original_size: tuple[int, int] | None = None  # (w, h) before a downloader resized it (img2dataset)
    failed: SkipSample | None = None  # a document's media item that cannot be used (dropped or fatal: recipe)


def as_media(value: Any, kind: str, base: Path | None, where: str, name: str) -> MediaRef:
    if isinstance(value, Path):
        return MediaRef(kind, str(value), path=value)
    if isinstance(value, bytes):
        return MediaRef(kind, f"{where}.{name}", data=value)
    if isinstance(value, str) and value:
        if _is_url(value):
            raise SkipSample("remote_media", f"{where}: {kind} {value!r} is a URL; mio never downloads media, "
                                              f"fetch it first and point the recipe at the files")
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() or base is None else base / p
        return MediaRef(kind, str(p), path=p)
    raise SkipSample("bad_field", f"{where}: {name} must name a {kind} file, got {type(value).__name__}")


def _seconds(values: dict[str, Any], spec: str | None, where: str, name: str) -> float | None:
    if spec is None:
        return None
    v = lookup(values, spec, where, required=False)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise SkipSample("bad_field", f"{where}: {name} must be seconds, got {v!r}") from None


def _original_size(values: dict[str, Any], spec: str, where: str) -> tuple[int, int] | None:
    """``fields.original_size: WIDTH,HEIGHT`` (two field specs, checked by the recipe); None when
    the row lacks them."""
    size = [lookup(values, x.strip(), where, required=False) for x in spec.split(",")]
    if any(v is None for v in size):
        return None
    try:
        w, h = (int(float(v)) for v in size)
    except (TypeError, ValueError):
        raise SkipSample("bad_field", f"{where}: original size {size} is not two numbers") from None
    return (w, h) if w > 0 and h > 0 else None


# --- drafts ---------------------------------------------------------------------------------
Item = Text | MediaRef


@dataclass
class Draft:
    """A row turned into segments, media still as references. SFT drafts carry turns."""

    where: str
    items: list[Item]
    turns: list[tuple[str, list[Item]]] | None = None
    task: str | None = None

    def all_items(self) -> list[Item]:
        return [x for _, c in self.turns for x in c] if self.turns is not None else self.items


def draft_row(recipe: Recipe, row: Row) -> Draft:
    """One row -> its draft, or a SkipSample (bad row, missing field, language filter)."""
    values = row.fields()
    f = recipe.field_map()
    where = row.where
    if recipe.filters.languages:
        lang = lookup(values, f["language"], where, required=False)
        if lang not in recipe.filters.languages:
            raise SkipSample("language", f"{where}: language {lang!r} not in {recipe.filters.languages}")
    dt = recipe.data_type
    if dt == "text":
        return Draft(where, [Text(as_text(lookup(values, f["text"], where), where, "text"))])
    if dt in ("image_text", "speech_text", "video_text"):
        kind = {"image_text": IMAGE, "speech_text": SPEECH, "video_text": VIDEO}[dt]
        text = as_text(lookup(values, f["text"], where), where, "text")
        ref = as_media(lookup(values, f[kind], where), kind, row.base, where, f[kind])
        ref.text = text
        if kind == IMAGE and "original_size" in f:
            ref.original_size = _original_size(values, f["original_size"], where)
        if kind == SPEECH:
            ref.start = _seconds(values, f.get("start"), where, "start")
            ref.duration = _seconds(values, f.get("duration"), where, "duration")
        return Draft(where, [ref, Text(text)])
    if dt in ("interleaved", "video_interleaved"):
        items = _document_items(recipe, values, row, f)
        texts = " ".join(x.text for x in items if isinstance(x, Text))
        for x in items:
            if isinstance(x, MediaRef):
                x.text = texts
        return Draft(where, items)
    turns, task = _conversation(recipe, values, row, f)
    return Draft(where, [], turns=turns, task=task)


def _document_media(value: Any, kind: str, base: Path | None, where: str, name: str) -> MediaRef:
    """A document's media item; one that cannot be used is kept with its failure, and the
    recipe's ``filters.bad_media_in_document`` drops either it or the document."""
    try:
        return as_media(value, kind, base, where, name)
    except SkipSample as s:
        return MediaRef(kind, f"{where}: {value!r}", failed=s)


def _item(d: Any, base: Path | None, where: str, document: bool = False) -> Item:
    if not isinstance(d, dict):
        raise SkipSample("bad_field", f"{where}: segment {d!r} is not an object")
    aliases = {"image": IMAGE, "speech": SPEECH, "audio": SPEECH, "video": VIDEO}
    media = _document_media if document else as_media
    for key, kind in aliases.items():
        if d.get(key) is not None:
            return media(d[key], kind, base, where, key)
    if d.get("text") is not None:
        return Text(as_text(d["text"], where, "text"))
    raise SkipSample("unknown_segment", f"{where}: segment {d} has none of text/image/speech/audio/video")


def _document_items(recipe: Recipe, values: dict[str, Any], row: Row, f: dict[str, str]) -> list[Item]:
    where = row.where
    if recipe.layout == "obelics":  # aligned lists: texts[i] or images[i] is set, the other null
        texts = lookup(values, f["texts"], where)
        images = lookup(values, f["images"], where)
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise SkipSample("bad_field", f"{where}: obelics rows need equal-length lists `texts` and `images`")
        items: list[Item] = []
        for t, im in zip(texts, images):
            if im is not None:
                items.append(_document_media(im, IMAGE, row.base, where, "images"))
            elif t is not None:
                items.append(Text(as_text(t, where, "texts")))
        return items
    if recipe.layout == "mmc4":  # sentences + images matched to a sentence, placed before it
        sentences = lookup(values, f["text_list"], where)
        infos = lookup(values, f["image_info"], where)
        if not isinstance(sentences, list) or not isinstance(infos, list):
            raise SkipSample("bad_field", f"{where}: mmc4 rows need lists `text_list` and `image_info`")
        before: dict[int, list[Item]] = {}
        for info in infos:
            if not isinstance(info, dict) or "image_name" not in info or "matched_text_index" not in info:
                raise SkipSample("bad_field", f"{where}: mmc4 image_info entries need image_name and matched_text_index")
            before.setdefault(int(info["matched_text_index"]), []).append(
                _document_media(info["image_name"], IMAGE, row.base, where, "image_name"))
        items = []
        for i, s in enumerate(sentences):
            items += before.get(i, [])
            items.append(Text((" " if items else "") + as_text(s, where, "text_list")))
        return items
    segs = lookup(values, f["segments"], where)
    if not isinstance(segs, list) or not segs:
        raise SkipSample("bad_field", f"{where}: {f['segments']} must be a non-empty list of segments")
    return [_item(d, row.base, where, document=True) for d in segs]


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversation(recipe: Recipe, values: dict[str, Any], row: Row,
                  f: dict[str, str]) -> tuple[list[tuple[str, list[Item]]], str | None]:
    where = row.where
    task = lookup(values, f["task"], where, required=False)
    if recipe.layout == "llava":  # {"image": ..., "conversations": [{"from": "human", "value": "<image>\n..."}]}
        convs = lookup(values, f["conversations"], where)
        image = lookup(values, f["image"], where, required=False)
        if not isinstance(convs, list):
            raise SkipSample("bad_field", f"{where}: conversations must be a list")
        turns = []
        for m in convs:
            if not isinstance(m, dict) or m.get("from") not in LLAVA_ROLES:
                raise SkipSample("bad_conversation", f"{where}: turn {m!r} has no known `from`")
            text = as_text(m.get("value", ""), where, "value")
            items: list[Item] = []
            if "<image>" in text and image is not None:
                ref = as_media(image, IMAGE, row.base, where, "image")
                if recipe.image_first:  # LLaVA's own training code: "<image>\n" + the turn without it
                    items.append(ref)
                    text = text.replace("<image>", "").strip()
                else:
                    before, _, after = text.partition("<image>")
                    items += ([Text(before)] if before.strip() else []) + [ref]
                    text = after.lstrip("\n")
            if text:
                items.append(Text(text))
            turns.append((LLAVA_ROLES[m["from"]], items))
        return turns, None if task is None else str(task)
    messages = lookup(values, f["messages"], where)
    if not isinstance(messages, list):
        raise SkipSample("bad_field", f"{where}: messages must be a list of turns")
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            raise SkipSample("bad_conversation", f"{where}: turn {m!r} is not an object")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"text": content}]
        if not isinstance(content, list):
            raise SkipSample("bad_conversation", f"{where}: turn content must be a string or a list of segments")
        turns.append((str(m.get("role")), [_item(d, row.base, where) for d in content]))
    return turns, None if task is None else str(task)


def media_refs(draft: Draft) -> list[MediaRef]:
    return [x for x in draft.all_items() if isinstance(x, MediaRef)]

