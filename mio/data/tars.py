"""The one WebDataset tar stage of mio: every tar shard it reads or writes goes through here.

Reading -- the training reader, ``mio inspect``, the demo and the tests, and the input shards that
``mio prepare`` reads (img2dataset output, remote ``http://`` / ``pipe:`` shards) -- is
WebDataset's own stages, one shard at a time: ``url_opener`` opens the URL, ``tar_file_expander``
lists its members and ``group_by_keys`` groups them into samples (``__key__``, ``__url__`` and one
entry per member extension, lower case). They cost about 70 us per sample of the synthetic
stage-II shards (a tar reader of mio's own: 12 us), and ``mio bench data`` measures the whole
training path over them at 1.02M packed tokens per second per core, above its 1,000,000
floor: WebDataset's own stages are fast enough, so mio keeps no tar reader of its own to maintain.

A shard that fails is never silent: the whole samples read before the failure are kept (the one
the failure cut short is dropped; one whose next sample's first header arrived is whole, and
kept), and ``on_failure`` gets a :class:`ShardFailure` naming the URL, the reason and the error.
The default raises it, so a caller that does not count failures does not lose one.

Writing is ``wds.TarWriter`` with fixed member metadata (times, mode, owners), so the same samples
give the same bytes, and the same checksum in a manifest, on any machine and any rerun.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import webdataset as wds
from webdataset.gopen import Pipe, set_options
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from mio.userio import MioUserError

# Fixed tar member metadata: shards are reproducible to the byte (checksums in the manifest).
MEMBER_MTIME = 0
MEMBER_MODE = 0o444
MEMBER_OWNER = "mio"

# What a failing shard raises while it is opened or read: a missing file or an HTTP error (OSError;
# a ``pipe:`` or curl command that exits non-zero raises it from its read), a damaged or cut tar
# (tarfile.TarError, EOFError), a member name repeated within one sample (ValueError, from
# ``group_by_keys``) or a URL scheme WebDataset cannot open (ValueError).
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


class ShardReadError(MioUserError):
    """A shard that could not be read whole; the message names the URL and the error."""


@dataclass(frozen=True)
class ShardFailure:
    """One shard that failed.

    ``reason``: ``unreadable`` when no member could be read (a missing file, an HTTP 404, a
    command that failed at once, not a tar), ``truncated`` when it failed after ``members``
    members (damage, a cut download, a pipe that exited mid-stream); ``samples``: the whole
    samples read (and kept) before the failure.
    """

    url: str
    reason: str
    error: str
    members: int = 0
    samples: int = 0

    def message(self) -> str:
        kept = f"; the {self.samples} samples before it are kept" if self.samples else ""
        return f"{self.url}: shard {self.reason} after {self.members} members ({self.error}){kept}"


OnFailure = Callable[[ShardFailure], None]


def raise_failure(failure: ShardFailure) -> None:
    """The default ``on_failure``: a failed shard stops the reader with an error naming it."""
    raise ShardReadError(failure.message())


COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile's "r|*" reads them too
BLOCK = 512


def _header_ok(block: bytes) -> bool:
    """The header checksum holds (unsigned, or the signed sum some old tars wrote)."""
    field = block[148:156].strip(b"\0 ")
    if not field.isdigit():
        return False
    stored = int(field, 8)
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    return stored == unsigned or stored == unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:])


def _member_key(block: bytes) -> str | None:
    """The sample key (WebDataset's: the name up to the first dot of its last part) of a regular
    file's ustar header; None for an extension header (pax, GNU long name), whose name comes later."""
    if block[156:157] not in (b"0", b"\0", b"7"):
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345]:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return base_plus_ext(name.decode("utf-8", "surrogateescape"))[0]


def _member_blocks(block: bytes) -> int:
    """Bytes of the member data that follow a header, padded to whole blocks."""
    field = block[124:136]
    size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
    return -(-size // BLOCK) * BLOCK


class _ShardBytes:
    """A shard's byte stream as tarfile reads it, with the archive's block structure followed
    alongside: each header's checksum, each member's length, the end-of-archive block.

    Why a second look at the blocks: tarfile (and so WebDataset) takes a damaged member header,
    or a stream cut short, after the first member for the end of the archive -- silently, with no
    hook. Following the headers costs a checksum per member (a few microseconds; ``mio bench
    data`` measures the whole path). A compressed shard is left to its decompressor's checks.
    """

    def __init__(self, stream: IO[bytes], url: str) -> None:
        self.stream, self.url = stream, url
        self.offset = 0  # bytes read so far
        self.header = 0  # offset of the next header block
        self.partial = b""  # the start of a header block that a read cut in two
        self.end: int | None = None  # offset of the end-of-archive (zero) block
        self.damage: str | None = None
        self.key: str | None = None  # the sample key of the last member header read (None: not known)
        self.compressed: bool | None = None

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.compressed is None:
            self.compressed = data.startswith(COMPRESSED)
        if not self.compressed and self.damage is None:
            self._follow(data)
        self.offset += len(data)
        return data

    def _follow(self, data: bytes) -> None:
        if self.end is not None:
            if data.count(0) != len(data):
                self.damage = f"data after a zero block at byte {self.end} (a zeroed or damaged region)"
            return
        while (pos := self.header - self.offset) < len(data):  # pos < 0: the header began in the last read
            block = self.partial + data[max(pos, 0):pos + BLOCK]
            if len(block) < BLOCK:
                self.partial = block
                return
            self.partial = b""
            if block.count(0) == BLOCK:
                self.end = self.header
                self._follow(data[pos + BLOCK:])
                return
            if not _header_ok(block):
                self.damage = f"damaged member header at byte {self.header}"
                return
            self.key = _member_key(block)
            self.header += BLOCK + _member_blocks(block)

    def close(self) -> None:
        self.stream.close()

    def exit_problem(self) -> str | None:
        """For a ``pipe:`` or curl stream: closes it, and says how its command failed (if it did)."""
        if not isinstance(self.stream, Pipe):
            return None
        self.stream.close()  # waits for the command
        status = self.stream.status
        return None if status in self.stream.ignore_status else f"its command exited with status {status}"

    def __str__(self) -> str:  # tarfile's errors name their stream: name the shard
        return self.url

    def check_end(self) -> None:
        """Raise ``tarfile.ReadError`` unless the archive that tarfile just finished was whole
        (read to the end of the stream, which past the end-of-archive block holds only zeros)."""
        while self.damage is None and self.read(1 << 20):
            pass
        if self.damage is not None:
            raise tarfile.ReadError(f"{self.damage}; the members after it are lost")
        if self.end is None and not self.compressed:
            raise tarfile.ReadError(f"cut short: the stream ends at byte {self.offset}, inside the archive")


class _Members:
    """The expander's members passed on to ``group_by_keys``, counted. At the shard's end the
    archive must have ended whole, else the sample in progress never leaves ``group_by_keys``; when
    the stream breaks off inside a member whose header names the NEXT sample, the sample in
    progress was whole: it is released (by the end-of-shard marker) before the error goes on."""

    def __init__(self, files: Iterable[dict[str, Any]], shard: _ShardBytes) -> None:
        self.files, self.shard, self.count = files, shard, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        files, key = iter(self.files), None
        while True:
            try:
                f = next(files)
            except StopIteration:
                return
            except SHARD_ERRORS:
                if key is not None and self.shard.key not in (None, key):
                    yield {}  # the expander's end-of-shard marker: group_by_keys releases the whole sample
                raise
            if f:
                self.count += 1
                key = base_plus_ext(f["fname"])[0]
            else:  # {}: the expander's end-of-shard marker, which releases the last sample
                self.shard.check_end()
            yield f


def _describe(e: BaseException) -> str:
    """An error's own message (WebDataset appends its stream and URL to the arguments)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    return f"{type(e).__name__}: {e.args[0] if e.args else e}"


def shard_samples(url: str, on_failure: OnFailure = raise_failure,
                  expected: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order: ``{"__key__", "__url__", <ext>: bytes, ...}``.

    ``expected``: the shard's sample count when known (a manifest's); fewer or more is a failure.
    """
    members: _Members | None = None
    samples = 0
    shard: _ShardBytes | None = None
    try:
        source = next(url_opener([{"url": url}]))
        # A command's exit status is checked once, at the end: WebDataset's check at every read
        # would throw away what the pipe delivered before its command exited.
        set_options(source["stream"], ignore_errors=True)
        shard = source["stream"] = _ShardBytes(source["stream"], url)
        members = _Members(tar_file_expander([source]), shard)
        for sample in group_by_keys(members):
            samples += 1
            yield sample
        if problem := shard.exit_problem():  # the archive was whole, but its command failed
            raise OSError(problem)
        if expected is not None and samples != expected:
            raise tarfile.ReadError(f"read {samples} samples, its manifest lists {expected}")
    except SHARD_ERRORS as e:
        read = members.count if members is not None else 0
        problem = shard.exit_problem() if shard is not None else None
        error = _describe(e) + (f"; {problem}" if problem and problem not in str(e) else "")
        on_failure(ShardFailure(url, "truncated" if read else "unreadable", error, read, samples))
    finally:
        if shard is not None:  # left early, or failed: closing again is a no-op, and must not raise over that
            try:
                shard.close()
            except SHARD_ERRORS:
                pass


def tar_samples(urls: Iterable[str | dict[str, Any]], on_failure: OnFailure = raise_failure,
                expected: Mapping[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of many shards (URLs, or WebDataset's ``{"url": ...}`` items), shard after
    shard; ``expected`` maps a URL to its sample count where a manifest gives one."""
    for item in urls:
        url = item["url"] if isinstance(item, dict) else item
        yield from shard_samples(url, on_failure, expected.get(url) if expected else None)


class TarSamples:
    """``tar_samples`` as a picklable WebDataset pipeline stage (DataLoader workers run it):
    ``wds.DataPipeline(wds.SimpleShardList(urls), TarSamples(on_failure), ...)``."""

    def __init__(self, on_failure: OnFailure = raise_failure, expected: Mapping[str, int] | None = None) -> None:
        self.on_failure, self.expected = on_failure, expected

    def __call__(self, urls: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return tar_samples(urls, self.on_failure, self.expected)


def tar_writer(stream: IO[bytes]) -> wds.TarWriter:
    """A ``wds.TarWriter`` over an open binary stream that writes each sample's members (bytes,
    sorted by name, ``<key>.<ext>``) with fixed metadata. Closing it ends the archive (two zero
    blocks, padded to a whole tar record) and leaves ``stream`` open."""
    return wds.TarWriter(stream, user=MEMBER_OWNER, group=MEMBER_OWNER, mode=MEMBER_MODE, mtime=MEMBER_MTIME,
                         encoder=False)
