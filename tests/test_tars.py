"""The one tar stage (mio/data/tars.py): WebDataset's stages, and no damage ever read silently."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mio.data.shards import AtomicShardWriter, StoredSample, iter_shard
from mio.data.tars import ShardFailure, ShardReadError, TarSamples, shard_samples, tar_samples
from mio.segments import Image, Text


def _write(path: Path, n: int = 6) -> list[StoredSample]:
    samples = [StoredSample(f"s-{i:04d}", "image_text", [Image(list(range(i, i + 32))), Text("x" * (300 * i))])
               for i in range(n)]
    with AtomicShardWriter(path) as w:
        for s in samples:
            w.write(s)
    return samples


def _read(url: str) -> tuple[list[dict], list[ShardFailure]]:
    """The samples of a shard (without ``__url__``) and its failures."""
    failures: list[ShardFailure] = []
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in shard_samples(url, failures.append)]
    return samples, failures


def _whole_samples(members: list[tarfile.TarInfo], read: int) -> int:
    """Samples a reader may release when the first ``read`` members arrived whole and then the
    shard failed: those whose next member was read (the one in progress is dropped)."""
    keys = [m.name.split(".", 1)[0] for m in members[:read]]
    return len(set(keys[:-1]) - {keys[-1]}) if keys else 0


def _end_block(members: list[tarfile.TarInfo]) -> int:
    """Offset of the end-of-archive block: after the last member's data."""
    return members[-1].offset_data + -(-members[-1].size // 512) * 512


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, bytes, list[tarfile.TarInfo], list[dict]]:
    path = tmp_path_factory.mktemp("tars") / "x.tar"
    _write(path)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    whole, failures = _read(str(path))
    assert not failures and [s["__key__"] for s in whole] == [f"s-{i:04d}" for i in range(6)]
    return path, path.read_bytes(), members, whole


def test_every_cut_is_counted_and_keeps_the_whole_samples_before_it(shard, tmp_path):
    path, data, members, whole = shard
    last_block = _end_block(members)
    for cut in range(0, len(data) + 1, 256):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        got, failures = _read(str(tmp_path / "cut.tar"))
        assert got == whole[:len(got)], cut  # a prefix, each sample whole and equal
        if cut >= last_block + 512:  # the end-of-archive block arrived: nothing is lost
            assert not failures and len(got) == 6, cut
            continue
        read = sum(m.offset_data + m.size <= cut for m in members)
        assert len(failures) == 1 and len(got) == _whole_samples(members, read), (cut, failures)
        f = failures[0]
        assert f.url.endswith("cut.tar") and f.samples == len(got)
        assert f.reason == ("unreadable" if cut <= 512 else "truncated"), (cut, f)


def test_every_damaged_header_is_counted(shard, tmp_path):
    path, data, members, whole = shard
    for i, member in enumerate(members):
        damaged = bytearray(data)
        damaged[member.offset + 100] ^= 1  # the mode field: the header checksum no longer holds
        (tmp_path / "bad.tar").write_bytes(bytes(damaged))
        got, failures = _read(str(tmp_path / "bad.tar"))
        assert len(failures) == 1, i  # tarfile alone would take it for the end of the archive
        assert got == whole[:_whole_samples(members, i)], i
    junk = bytearray(data)
    junk[_end_block(members) + 2048] = 7  # non-zero bytes after the end-of-archive block
    (tmp_path / "junk.tar").write_bytes(bytes(junk))
    assert "after a zero block" in _read(str(tmp_path / "junk.tar"))[1][0].error


def test_a_pipe_that_fails_is_counted_and_named(shard):
    path, data, members, whole = shard
    got, failures = _read(f"pipe:head -c {members[5].offset_data + 10} {path}; exit 3")
    assert got == whole[:2] and failures[0].reason == "truncated" and failures[0].url.startswith("pipe:head")
    got, failures = _read(f"pipe:cat {path}; exit 3")  # all bytes, then a non-zero exit status
    assert got == whole and failures[0].error == "OSError: its command exited with status 3"
    got, failures = _read("pipe:exit 7")
    assert got == [] and failures[0].reason == "unreadable"
    got, failures = _read(str(path.parent / "missing.tar"))
    assert got == [] and failures[0] == ShardFailure(str(path.parent / "missing.tar"), "unreadable",
                                                      "FileNotFoundError: No such file or directory")
    first = next(shard_samples(f"pipe:cat {path}"))  # leaving a pipe early raises nothing
    assert first["json"] == whole[0]["json"]


def test_failures_raise_by_default_and_manifest_counts_are_held(shard):
    path, data, members, whole = shard
    with pytest.raises(ShardReadError, match="missing.tar: shard unreadable"):
        list(tar_samples([str(path.parent / "missing.tar")]))
    failures: list[ShardFailure] = []
    stage = TarSamples(failures.append, expected={str(path): 7})
    assert [s["__key__"] for s in stage([{"url": str(path)}])] == [s["__key__"] for s in whole]
    assert "its manifest lists 7" in failures[0].error and failures[0].samples == 6
    assert [s.key for s in iter_shard(str(path))] == [f"s-{i:04d}" for i in range(6)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tars_of_other_writers_read_whole(tmp_path, fmt):
    """Long names (GNU long-name and pax entries), non-ASCII names, empty members, directories."""
    names = ["a.json", "a.jpg", "b.json", "d/" + "x" * 150 + ".txt", "\u00e9t\u00e9.json"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:3]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(bytes(range(256)) * (700 * i // 256) + bytes(700 * i % 256)))
    got, failures = _read(str(path))
    assert not failures
    members = {(s["__key__"], ext): data for s in got for ext, data in s.items() if not ext.startswith("__")}
    with tarfile.open(path) as tar:
        assert members == {tuple(m.name.split(".", 1)): tar.extractfile(m).read() for m in tar if m.isreg()}
    assert [s["__key__"] for s in got] == list(dict.fromkeys(n.split(".", 1)[0] for n in names))
