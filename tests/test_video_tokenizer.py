"""Video key frames: PySceneDetect finds the scenes of a real (PyAV-encoded) video, frames are chosen
by text length, each goes through the image tokenizer; bad files are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mio.tokenizers import VideoTokenizer, build_tokenizer, tokenize_cli
from mio.tokenizers.video import KeyFramePolicy, choose_frames

ROOT = Path(__file__).resolve().parents[1]
TINY_VIDEO = ROOT / "tokenizers" / "tiny" / "video.yaml"
FPS = 25


def write_video(path: Path, scenes: list[tuple[tuple[int, int, int], str]], seconds: float = 1.0) -> None:
    """Scenes of a solid colour (maybe striped) with a drifting box, MPEG-4 in an .mp4."""
    w, h = 96, 64
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for colour, pattern in scenes:
            for i in range(int(FPS * seconds)):
                img = np.empty((h, w, 3), np.uint8)
                img[:] = colour
                if pattern == "stripes":
                    img[:, np.arange(w) % 16 < 4] = 255 - np.asarray(colour)
                x = i % (w - 16)  # a small box drifting right: motion, but no cut
                img[20:36, x : x + 16] = (255, 255, 255)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def video_tok() -> VideoTokenizer:
    return build_tokenizer(TINY_VIDEO)


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "three_scenes.mp4"
    # deep blue with stripes, bright yellow with a box, dark red with stripes
    write_video(path, [((10, 20, 160), "stripes"), ((250, 230, 40), "box"), ((120, 10, 10), "stripes")])
    return path


def test_detector_finds_the_three_scenes(video_tok: VideoTokenizer, three_scenes: Path) -> None:
    scenes, total = video_tok.detect_scenes(three_scenes)
    assert total == 75
    assert len(scenes) == 3
    cuts = [start for start, _ in scenes[1:]]
    assert all(abs(c - expected) <= 1 for c, expected in zip(cuts, (25, 50))), scenes


def test_key_frames_cover_every_scene_and_follow_text_length(video_tok: VideoTokenizer, three_scenes: Path) -> None:
    frames, images = video_tok.key_frames(three_scenes, None)
    assert len(frames) == 4 == len(images)  # 3 scenes, raised to the minimum of 4
    assert {f // 25 for f in frames} == {0, 1, 2}  # one frame in each scene at least
    short, _ = video_tok.key_frames(three_scenes, "a red, a yellow and a blue scene")
    long, _ = video_tok.key_frames(three_scenes, " ".join(["word"] * 100))
    assert (len(short), len(long)) == (4, 8)
    middle = np.asarray(images[0])
    assert middle.shape == (64, 96, 3) and middle[..., 2].mean() > middle[..., 0].mean()  # the blue scene


def test_encode_gives_codes_per_key_frame(video_tok: VideoTokenizer, three_scenes: Path) -> None:
    codes = video_tok.encode(three_scenes, " ".join(["word"] * 50))
    assert codes.shape == (7, 32) and codes.dtype == np.int64  # ceil(50 / 8) = 7 frames
    assert codes.min() >= 0 and codes.max() < video_tok.codebook_size
    blue, yellow = codes[0], codes[3]
    assert not np.array_equal(blue, yellow)
    np.testing.assert_array_equal(codes, video_tok.encode(three_scenes, " ".join(["word"] * 50)))


def test_uniform_fallback_without_cuts(video_tok: VideoTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "one_scene.mp4"
    write_video(path, [((40, 160, 40), "box")], seconds=2.0)
    scenes, total = video_tok.detect_scenes(path)
    assert len(scenes) <= 1 and total == 50
    frames, _ = video_tok.key_frames(path, None)
    assert frames == [6, 18, 31, 43]  # middles of 4 equal stretches of 50 frames


def test_release_frames_one_per_scene_uncapped_and_every_tenth_without_cuts(video_tok: VideoTokenizer,
                                                                            three_scenes: Path, tmp_path: Path) -> None:
    """`selection: mio-release`: MIO's released frames (scenedetect's middle frame of every scene,
    however many; with no cut every (total // 10)-th frame), not the paper's 4..8."""
    release = VideoTokenizer(video_tok.image, KeyFramePolicy(selection="mio-release"))
    scenes, _ = video_tok.detect_scenes(three_scenes)
    frames, _ = release.key_frames(three_scenes, " ".join(["word"] * 100))  # the text does not matter
    assert len(frames) == 3  # below the paper's minimum of 4
    # The middle of each scene of 25 frames (the cuts land within a frame of 25 and 50).
    assert all(abs(f - middle) <= 1 for f, middle in zip(frames, (12, 37, 62))), frames
    assert all(s <= f < e and abs(f - (s + e - 1) / 2) <= 0.5 for f, (s, e) in zip(frames, scenes)), (frames, scenes)
    many = tmp_path / "ten_scenes.mp4"
    palette = [(10, 20, 160), (250, 230, 40)]
    write_video(many, [(palette[i % 2], "stripes" if i % 4 < 2 else "box") for i in range(10)], seconds=0.8)
    scenes, _ = video_tok.detect_scenes(many)
    assert len(release.key_frames(many)[0]) == len(scenes) > 8  # over the paper's cap of 8
    still = tmp_path / "one_scene.mp4"
    write_video(still, [((40, 160, 40), "box")], seconds=2.0)
    assert release.key_frames(still)[0] == list(range(0, 50, 5))  # 50 frames: every 5th
    assert release.encode(still).shape == (10, 32)
    with pytest.raises(ValueError, match="selection"):
        KeyFramePolicy(selection="every-frame")


def test_frame_count_policy() -> None:
    policy = KeyFramePolicy()
    assert policy.frame_count("", 1) == 4
    assert policy.frame_count(" ".join(["w"] * 33), 1) == 5
    assert policy.frame_count(" ".join(["w"] * 1000), 1) == 8
    assert policy.frame_count(None, 6) == 6 and policy.frame_count(None, 20) == 8
    with pytest.raises(ValueError):
        KeyFramePolicy(min_frames=5, max_frames=4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=0, max_size=12),  # scene lengths
    st.integers(1, 10),
)
def test_choose_frames_properties(lengths: list[int], n: int) -> None:
    bounds = np.cumsum([0] + lengths)
    total = int(bounds[-1]) if lengths else 30
    scenes = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    frames = choose_frames(scenes, total, n)
    assert frames == sorted(set(frames))  # sorted, distinct
    assert len(frames) == min(n, total)
    assert all(0 <= f < total for f in frames)
    if 2 <= len(scenes) <= n:  # every scene is represented
        assert all(any(a <= f < b for f in frames) for a, b in scenes)


def test_bad_videos_name_the_file(video_tok: VideoTokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        video_tok.encode(tmp_path / "absent.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a video at all" * 100)
    with pytest.raises(ValueError, match="garbage.mp4"):
        video_tok.encode(garbage)
    zeroed = tmp_path / "no_frames.mp4"  # a well-formed MP4 whose frame data is all zeros
    write_video(zeroed, [((200, 200, 200), "box")])
    data = zeroed.read_bytes()
    at = data.index(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    zeroed.write_bytes(data[: at + 4] + bytes(size - 8) + data[at - 4 + size :])
    with pytest.raises(ValueError, match="no_frames.mp4"):
        video_tok.encode(zeroed)
    sound = tmp_path / "sound_only.wav"
    sound.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(ValueError, match="sound_only.wav"):
        video_tok.encode(sound)


def test_tokenize_cli_video(three_scenes: Path, tmp_path: Path) -> None:
    rows = list(tokenize_cli(str(TINY_VIDEO), [str(three_scenes), str(tmp_path / "gone.mp4")]))
    assert rows[0]["kind"] == "video" and len(rows[0]["codes"]) == len(rows[0]["frames"]) == 4
    assert "gone.mp4" in rows[1]["error"]
    json.dumps(rows)  # JSON-ready
