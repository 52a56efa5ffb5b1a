"""Shard format: round trips, reproducible bytes, plain tar / WebDataset readability, safe decoding."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from mio.data.shards import (
    AtomicShardWriter,
    ShardError,
    StoredSample,
    decode_sample,
    encode_sample,
    file_sha256,
    iter_shard,
    load_npy,
)
from mio.segments import Image, Speech, Text, Video
from mio.templates import Turn

texts = st.text(min_size=0, max_size=40)
images = st.builds(lambda s: Image(np.random.default_rng(s).integers(0, 8192, 32)), st.integers(0, 2**32 - 1))
speeches = st.builds(lambda s, layers, frames: Speech(np.random.default_rng(s).integers(0, 1024, (layers, frames))),
                     st.integers(0, 2**32 - 1), st.sampled_from([1, 4]), st.integers(1, 60))
videos = st.builds(lambda s, f: Video(np.random.default_rng(s).integers(0, 8192, (f, 32))),
                   st.integers(0, 2**32 - 1), st.integers(1, 8))
segments = st.lists(st.one_of(texts.map(Text), images, speeches, videos), min_size=1, max_size=6)


def _same(a: StoredSample, b: StoredSample) -> None:
    assert (a.key, a.data_type, a.task, a.source) == (b.key, b.data_type, b.task, b.source)
    assert a.all_segments() == b.all_segments()
    assert [type(s) for s in a.all_segments()] == [type(s) for s in b.all_segments()]


@settings(max_examples=60, deadline=None)
@given(segments, st.sampled_from(["interleaved", "video_interleaved", "image_text"]))
def test_encode_decode_round_trip(segs, data_type):
    sample = StoredSample("k-000001", data_type, segs, source="src")
    _same(decode_sample(encode_sample(sample)), sample)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), segments), min_size=1, max_size=4))
def test_conversation_round_trip(turns):
    sample = StoredSample("c-1", "sft", turns=[Turn(r, c) for r, c in turns], task="chat", source="s")
    _same(decode_sample(encode_sample(sample)), sample)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["<i2", "<i4", "<u2", "|i1", "|u1", ">i4", "<i8"]),
       st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_fast_npy_equals_numpy(dtype, shape):
    arr = np.random.default_rng(0).integers(0, 100, shape).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    got = load_npy(buf.getvalue(), "x")
    assert got.dtype == np.int64 and got.shape == arr.shape and np.array_equal(got, arr)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("member,data,match", [
    ("pyd", b"\x80\x04K\x01.", "not json or npy"),
    ("pth", b"PK\x03\x04", "not json or npy"),
    ("pickle", b"\x80\x04K\x01.", "not json or npy"),
    ("m0.npy", _npy(np.array([{"a": 1}], dtype=object)), "npy"),
    ("m0.npy", _npy(np.zeros(32, np.float32)), "integer"),
    ("m0.npy", _npy(np.arange(40, dtype=np.int16))[:-10], "npy"),
])
def test_decode_refuses_unsafe_members(member, data, match):
    raw = {"__key__": "k", "__url__": "shard.tar", "json": json.dumps(
        {"data_type": "image_text", "segments": [{"image": "m0.npy"}, {"text": "t"}]}).encode(), member: data}
    with pytest.raises(ShardError, match=match):
        decode_sample(raw)


def test_decode_names_missing_media_and_bad_json():
    meta = {"data_type": "image_text", "segments": [{"image": "m0.npy"}, {"text": "t"}]}
    with pytest.raises(ShardError, match="shard.tar:k.*m0.npy"):
        decode_sample({"__key__": "k", "__url__": "shard.tar", "json": json.dumps(meta).encode()})
    with pytest.raises(ShardError, match="does not parse"):
        decode_sample({"__key__": "k", "__url__": "shard.tar", "json": b"{nope"})
    with pytest.raises(ShardError, match="image codes must have 1 dimensions"):
        decode_sample({"__key__": "k", "json": json.dumps(meta).encode(), "m0.npy": _npy(np.zeros((2, 2), np.int16))})


def _samples(n: int) -> list[StoredSample]:
    rng = np.random.default_rng(1)
    return [StoredSample(f"s-{i:04d}", "speech_text", [Speech(rng.integers(0, 1024, (4, 10 + i))), Text(f"t{i} é")],
                         source="x") for i in range(n)]


def test_writer_is_reproducible_atomic_and_readable_everywhere(tmp_path):
    paths = []
    for name in ("a.tar", "b.tar"):
        with AtomicShardWriter(tmp_path / name) as w:
            for s in _samples(7):
                w.write(s)
        paths.append(tmp_path / name)
    assert file_sha256(paths[0]) == file_sha256(paths[1])  # fixed member times and owners
    assert not list(tmp_path.glob(".*.tmp"))
    listing = subprocess.run(["tar", "-tf", str(paths[0])], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:2] == ["s-0000.json", "s-0000.m0.npy"] and len(listing) == 14
    via_wds = [decode_sample(r) for r in wds.WebDataset(str(paths[0]), shardshuffle=False, empty_check=False)]
    for a, b in zip(via_wds, _samples(7)):
        _same(a, b)
    assert [s.key for s in iter_shard(str(paths[0]))] == [s.key for s in _samples(7)]


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicShardWriter(tmp_path / "x.tar") as w:
            w.write(_samples(1)[0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
