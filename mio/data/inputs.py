"""A recipe's input as *parts*, and the error that drops a row.

An input is a sorted list of parts (files, folders or tar URLs); each part yields rows in a fixed
order (:mod:`mio.data.formats`), so "row r of part p" names the same row on every run and every
rank. Every failure of a row is a :class:`SkipSample` with a stable reason name.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import braceexpand

from mio.userio import MioUserError

if TYPE_CHECKING:
    from mio.data.recipe import Recipe


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


def is_url(s: str) -> bool:
    """A location WebDataset opens (``http://``, ``pipe:``, ...), not a local path."""
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
        if is_url(pattern):
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
            raise MioUserError(f"{where}: input format is folder, but {loc} is not a folder")
        base = media_root or (None if is_url(loc) else (Path(loc) if fmt == "folder" else Path(loc).parent))
        rel = loc if is_url(loc) else os.path.relpath(loc, recipe.path.parent)
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
            if is_url(line):
                found = list(braceexpand.braceexpand(line))
                absent += [u for u in found if u.startswith("file://") and not os.path.exists(u[len("file://"):])]
            else:
                found = [str((Path(f).parent / p).resolve()) for p in braceexpand.braceexpand(line)]
                absent += [p for p in found if not os.path.exists(p)]
            urls += found
    if files and not urls:
        raise MioUserError(f"{where}: the URL list(s) {files} name no shard")
    return urls, absent
