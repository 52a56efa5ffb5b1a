"""Rows of a part, one reader per input format (jsonl, json, csv/tsv, parquet, folder, tar).

Parsing a row is deferred (``InputRow.fields()``): a rank skips rows it does not own without parsing
them. A reader that fails part-way keeps the rows before the failure and ends with one counted
row naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from mio.data.inputs import Part, SkipSample
from mio.data.tars import ShardFailure, shard_samples
from mio.userio import MioUserError


@dataclass
class InputRow:
    where: str  # "file.jsonl:12", "shard.tar:key", ...
    parse: Callable[[], dict[str, Any]]  # raises SkipSample
    base: Path | None
    read: float | None = None  # the fraction of its part read so far (progress), when the reader knows it
    input_failure: bool = False  # the reader's own failure (missing input, input that broke off): retried on rerun

    def fields(self) -> dict[str, Any]:
        return self.parse()


def iter_rows(part: Part) -> Iterator[InputRow]:
    """The rows of one part, in their fixed order, by the reader of its format."""
    if part.missing:
        detail = f"{part.name}: input file is missing (skipped: input.allow_missing is set)"
        return iter([InputRow(f"{part.name}:start", lambda: _raise("missing_file", detail), part.media_base,
                         input_failure=True)])
    return FORMAT_READERS[part.format](part)


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


def _jsonl_rows(part: Part) -> Iterator[InputRow]:
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
                    yield InputRow(where, lambda line=line, where=where: _parse_json_line(line, where), part.media_base,
                              read=raw.tell() / max(size, 1))
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        where, detail = f"{part.name}:end", f"{part.name}: input ends early after line {lineno} ({e})"
        yield InputRow(where, lambda: _raise("truncated_input", detail), part.media_base, input_failure=True)


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


def _json_array_rows(part: Part) -> Iterator[InputRow]:
    """A JSON file holding one array of row objects (LLaVA-Instruct and similar releases)."""
    opener = gzip.open if part.locator.endswith(".gz") else open
    with opener(part.locator, "rb") as fh:
        try:
            rows = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MioUserError(f"{part.name}: not a JSON array of rows ({e}); use format jsonl for one object "
                             f"a line") from None
    if not isinstance(rows, list):
        raise MioUserError(f"{part.name}: a json input must hold an array of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        where = f"{part.name}:[{i}]"
        yield InputRow(where, lambda row=row, where=where: row if isinstance(row, dict) else
                  _raise("bad_json", f"{where}: row is not an object"), part.media_base, read=(i + 1) / len(rows))


def _raise(reason: str, detail: str) -> dict[str, Any]:
    raise SkipSample(reason, detail)


def _csv_rows(part: Part) -> Iterator[InputRow]:
    delimiter = "\t" if part.format == "tsv" else ","
    size = os.path.getsize(part.locator)
    with open(part.locator, "rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if part.locator.endswith(".gz") else raw
        fh = io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(fh, delimiter=delimiter)
        for row in reader:
            where = f"{part.name}:{reader.line_num}"
            yield InputRow(where, lambda row=row, where=where: _checked_csv_row(row, where), part.media_base,
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


def _parquet_rows(part: Part) -> Iterator[InputRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(part.locator)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise MioUserError(f"{part.name}: not a readable parquet file: {e}") from None
    index, total = 0, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            where = f"{part.name}:row {index}"
            index += 1
            yield InputRow(where, lambda row=row: row, part.media_base, read=index / total)


def _key_and_ext(name: str) -> tuple[str, str] | None:
    """WebDataset's convention: key = path up to the first dot of the basename."""
    folder, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _folder_rows(part: Part) -> Iterator[InputRow]:
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
        yield InputRow(where, lambda members=members: dict(members), part.media_base, read=(i + 1) / len(groups))


def _tar_rows(part: Part) -> Iterator[InputRow]:
    """Samples of a tar shard (a local file, ``http(s)://``, ``pipe:``, ...) read through mio's one
    tar stage. A shard that fails keeps the samples before the failure and ends with one counted
    row naming the URL and the error: ``missing_file`` when nothing could be read (a missing file,
    an HTTP 404, a command that failed at once), ``truncated_input`` when it broke off."""
    failures: list[ShardFailure] = []
    for sample in shard_samples(part.locator, on_failure=failures.append):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        yield InputRow(f"{part.name}:{sample['__key__']}", lambda members=members: members, part.media_base)
    for f in failures:
        if f.reason == "unreadable":
            reason, where, what = "missing_file", f"{part.name}:start", "could not be read"
        else:
            reason, where, what = "truncated_input", f"{part.name}:end", f"broke off after {f.members} members"
        detail = f"{part.name}: input shard {what} ({f.error}); the {f.samples} samples before it are kept"
        yield InputRow(where, lambda reason=reason, detail=detail: _raise(reason, detail), part.media_base,
                  input_failure=True)


# Input format (a recipe's ``input.format``, ``urls`` read as ``tar``) -> its reader.
FORMAT_READERS: dict[str, Callable[[Part], Iterator[InputRow]]] = {
    "jsonl": _jsonl_rows, "json": _json_array_rows, "csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows,
    "folder": _folder_rows, "tar": _tar_rows}
