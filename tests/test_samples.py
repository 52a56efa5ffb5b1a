"""The bundled raw samples (data_recipes/samples/): every referenced file exists and decodes, counts as stated.

The demo memorises the image-caption and speech-text pairs, so they must be distinct and the SFT
conversations of those tasks must use exactly these pairs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "data_recipes" / "samples"
MEDIA_KEYS = {"image", "speech", "video"}
SFT_TASKS = {"image_captioning", "image_generation", "asr", "tts", "image_qa", "video_understanding", "chat"}
LOWER_WORDS = re.compile(r"[a-z]+( [a-z]+)*")


def read_jsonl(name: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate((SAMPLES / name).read_text(encoding="ascii").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise AssertionError(f"{name}:{number} is not JSON: {error}") from error
    return rows


def media_path(rel: str) -> Path:
    """A path as written in the JSONL files: relative to the samples folder, inside it."""
    assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
    path = SAMPLES / rel
    assert path.is_file(), f"{rel} is referenced but missing"
    return path


def word_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- pairs


def test_image_text_pairs_are_16_distinct_224_rgb_jpegs_with_short_captions() -> None:
    rows = read_jsonl("image_text.jsonl")
    assert len(rows) == 16
    assert all(set(row) == {"image", "caption"} for row in rows)
    captions = [row["caption"] for row in rows]
    assert len(set(captions)) == 16
    for caption in captions:
        assert LOWER_WORDS.fullmatch(caption) and 5 <= word_count(caption) <= 12, caption
    pixels = []
    for row in rows:
        with Image.open(media_path(row["image"])) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (224, 224)), row["image"]
            pixels.append(np.asarray(image, dtype=np.float32))  # (224, 224, 3)
    assert len({row["image"] for row in rows}) == 16
    # Distinct photographs, not near-copies: every pair differs by a clear mean pixel distance.
    stack = np.stack(pixels)  # (16, 224, 224, 3)
    distance = np.abs(stack[:, None] - stack[None]).mean(axis=(2, 3, 4))  # (16, 16)
    assert distance[~np.eye(16, dtype=bool)].min() > 10.0


def test_speech_text_pairs_are_16_clips_of_16khz_mono_pcm16() -> None:
    rows = read_jsonl("speech_text.jsonl")
    assert len(rows) == 16
    assert all(set(row) == {"audio", "text"} for row in rows)
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == 16
    for text in texts:
        assert LOWER_WORDS.fullmatch(text) and 4 <= word_count(text) <= 9, text
    for row in rows:
        info = sf.info(media_path(row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16"), row["audio"]
        assert 1.5 <= info.duration <= 3.5, (row["audio"], info.duration)
        audio, _ = sf.read(media_path(row["audio"]), dtype="float32")  # (N,)
        assert np.abs(audio).max() > 0.5, f"{row['audio']} is (nearly) silent"
    assert len({row["audio"] for row in rows}) == 16


def test_video_text_pairs_are_4_distinct_videos_with_text() -> None:
    rows = read_jsonl("video_text.jsonl")
    assert len(rows) == 4
    assert all(set(row) == {"video", "text"} for row in rows)
    assert len({row["video"] for row in rows}) == 4 and len({row["text"] for row in rows}) == 4
    assert all(media_path(row["video"]).suffix == ".mp4" for row in rows)


def scene_cuts(frames: np.ndarray) -> int:
    """Number of hard cuts between consecutive frames of (F, H, W, 3) uint8.

    A cut changes the intensity histogram (L1 distance of normalised 32-bin histograms, in [0, 2])
    by about 1; a pan or zoom within one photograph moves pixels a lot but keeps it under 0.2.
    """
    histograms = np.stack([np.bincount(f.ravel() // 8, minlength=32) / f.size for f in frames])  # (F, 32)
    change = np.abs(np.diff(histograms, axis=0)).sum(axis=1)  # (F - 1,)
    return int((change > 0.5).sum())


def test_videos_decode_as_224_at_8fps_with_3_scenes() -> None:
    av = pytest.importorskip("av")
    for row in read_jsonl("video_text.jsonl"):
        with av.open(str(media_path(row["video"]))) as container:
            stream = container.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])  # (F, H, W, 3)
            fps = float(stream.average_rate)
        assert frames.shape[1:] == (224, 224, 3), row["video"]
        assert abs(fps - 8) < 0.5 and 2.0 <= len(frames) / fps <= 4.0, (row["video"], fps, len(frames))
        assert scene_cuts(frames) == 2, row["video"]


# ---------------------------------------------------------------- documents


def test_text_has_16_distinct_short_paragraphs() -> None:
    rows = read_jsonl("text.jsonl")
    assert len(rows) == 16 and all(set(row) == {"text"} for row in rows)
    assert len({row["text"] for row in rows}) == 16
    for row in rows:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", row["text"].strip()) if s]
        assert 1 <= len(sentences) <= 3, row["text"]


def segment_kinds(segments: list[dict[str, str]], media: str) -> list[str]:
    """The kind of each segment ('text' or `media`), checking each has one key and its file exists."""
    kinds = []
    for segment in segments:
        assert len(segment) == 1 and next(iter(segment)) in {"text", media}, segment
        kind, value = next(iter(segment.items()))
        assert isinstance(value, str) and value.strip(), segment
        if kind == media:
            media_path(value)
        kinds.append(kind)
    return kinds


def test_interleaved_documents_mix_text_and_bundled_images() -> None:
    rows = read_jsonl("interleaved.jsonl")
    assert len(rows) == 6
    bundled = {row["image"] for row in read_jsonl("image_text.jsonl")}
    for row in rows:
        kinds = segment_kinds(row["segments"], "image")
        assert kinds.count("image") >= 2 and kinds.count("text") >= 2, row
        assert {s["image"] for s in row["segments"] if "image" in s} <= bundled


def test_video_interleaved_documents_alternate_text_and_bundled_videos() -> None:
    rows = read_jsonl("video_interleaved.jsonl")
    assert len(rows) == 2
    bundled = {row["video"] for row in read_jsonl("video_text.jsonl")}
    for row in rows:
        kinds = segment_kinds(row["segments"], "video")
        assert kinds[0] == "text" and "video" in kinds, row
        assert all(a != b for a, b in zip(kinds, kinds[1:])), f"segments do not alternate: {kinds}"
        assert {s["video"] for s in row["segments"] if "video" in s} <= bundled


# ---------------------------------------------------------------- SFT


def content_of(conversation: dict[str, Any], role: str) -> list[dict[str, str]]:
    return [item for message in conversation["messages"] if message["role"] == role for item in message["content"]]


def the_one(items: list[dict[str, str]], key: str) -> str:
    values = [item[key] for item in items if key in item]
    assert len(values) == 1, items
    return values[0]


def test_sft_conversations_are_well_formed_chatml_turns() -> None:
    rows = read_jsonl("sft.jsonl")
    assert {row["task"] for row in rows} == SFT_TASKS
    for row in rows:
        roles = [message["role"] for message in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant", row
        assert all(a != b for a, b in zip(roles, roles[1:])), f"roles do not alternate: {roles}"
        for message in row["messages"]:
            assert message["content"], row
            for item in message["content"]:
                assert len(item) == 1 and next(iter(item)) in MEDIA_KEYS | {"text"}, item
                kind, value = next(iter(item.items()))
                if kind in MEDIA_KEYS:
                    media_path(value)


def sft_pairs(task: str, media: str, text_role: str) -> set[tuple[str, str]]:
    """(media file, text) of every conversation of `task`, the text taken from `text_role`'s turn."""
    media_role = "assistant" if text_role == "user" else "user"
    return {(the_one(content_of(row, media_role), media), the_one(content_of(row, text_role), "text"))
            for row in read_jsonl("sft.jsonl") if row["task"] == task}


def test_sft_captioning_and_asr_use_exactly_the_bundled_pairs() -> None:
    images = {(row["image"], row["caption"]) for row in read_jsonl("image_text.jsonl")}
    speech = {(row["audio"], row["text"]) for row in read_jsonl("speech_text.jsonl")}
    assert sft_pairs("image_captioning", "image", "assistant") == images
    assert sft_pairs("asr", "speech", "assistant") == speech


def test_sft_generation_and_tts_ask_for_exactly_the_bundled_pairs() -> None:
    images = dict((row["image"], row["caption"]) for row in read_jsonl("image_text.jsonl"))
    speech = dict((row["audio"], row["text"]) for row in read_jsonl("speech_text.jsonl"))
    generated = sft_pairs("image_generation", "image", "user")
    spoken = sft_pairs("tts", "speech", "user")
    assert {image for image, _ in generated} == set(images)
    assert {audio for audio, _ in spoken} == set(speech)
    assert all(images[image] in prompt for image, prompt in generated)
    assert all(speech[audio] in prompt for audio, prompt in spoken)


# ---------------------------------------------------------------- the folder


def test_folder_is_small_and_every_media_file_is_referenced() -> None:
    files = [p for p in SAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 4 * 1024 * 1024
    assert not [p for p in files if p.name == "__init__.py"]
    referenced = set()
    for name in ("image_text.jsonl", "speech_text.jsonl", "video_text.jsonl"):
        referenced |= {value for row in read_jsonl(name) for key, value in row.items() if key in {"image", "audio", "video"}}
    media = {p.relative_to(SAMPLES).as_posix() for p in files if p.parent.name in {"images", "speech", "videos"}}
    assert media == referenced
