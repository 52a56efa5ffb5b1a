"""VideoTokenizer: a video -> key frames -> 32 SEED codes per frame, (F, 32).

Key frames follow the MIO paper (`selection: paper`, the default): scene cuts from PySceneDetect's
content detector, one frame from the middle of each scene, and uniform sampling when the detector
finds no cut.  How many frames:

* with a paired text (video-text pairs): 4 to 8, one per `words_per_frame` words of the text;
* without one (interleaved video): one per scene, clamped to the same 4..8.

When the scenes are fewer than the frames wanted, the extra frames go where the video is least
covered (farthest from the frames already chosen); when they are more, scenes are taken evenly.

`selection: mio-release` cuts as MIO's released inference code does: one middle frame per detected
scene, with no cap; with no cut, every (total // 10)-th frame from the first.
Frames are decoded with PyAV, and the detector runs on PyAV too, so frame numbers agree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mio.tokenizers.image import ImageTokenizer
from mio.tokenizers.spec import check_kind, load_spec
from mio.userio import MioUserError

SELECTIONS = ("paper", "mio-release")


@dataclass(frozen=True)
class KeyFramePolicy:
    min_frames: int = 4
    max_frames: int = 8
    words_per_frame: int = 8
    threshold: float = 27.0  # ContentDetector's default: HSV change that counts as a cut
    min_scene_len: int = 15  # frames; shorter scenes merge into their neighbour
    selection: str = "paper"  # or "mio-release": MIO's released frames (see the module's docstring)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise MioUserError(f"video frame selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise MioUserError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.words_per_frame < 1:
            raise MioUserError(f"words_per_frame must be >= 1, got {self.words_per_frame}")

    def frame_count(self, text: str | None, num_scenes: int) -> int:
        """Frames to take: by the paired text's length, else one per scene; within [min, max]."""
        wanted = num_scenes if text is None else math.ceil(len(text.split()) / self.words_per_frame)
        return min(max(wanted, self.min_frames), self.max_frames)


class VideoTokenizer:
    def __init__(self, image: ImageTokenizer, policy: KeyFramePolicy | None = None) -> None:
        self.image = image
        self.policy = policy or KeyFramePolicy()
        self.codebook_size = image.codebook_size
        self.tokens_per_image = image.tokens_per_image

    @classmethod
    def from_spec(cls, spec: dict[str, Any], where: str, base: Path) -> "VideoTokenizer":
        image_spec = spec.get("image")
        if image_spec is None:
            raise MioUserError(f"tokenizer spec {where}: `image` (the SEED spec for the frames) is required")
        image_where = "<dict>" if isinstance(image_spec, dict) else str(base / image_spec)
        parsed = image_spec if isinstance(image_spec, dict) else load_spec(base / image_spec)
        if check_kind(parsed, image_where) != "seed":
            raise MioUserError(f"tokenizer spec {where}: `image` must be a SEED (kind: seed) spec")
        image = ImageTokenizer.from_spec(parsed, image_where)
        fields = KeyFramePolicy.__dataclass_fields__
        unknown = set(spec) - set(fields) - {"kind", "image"}
        if unknown:
            raise MioUserError(f"tokenizer spec {where}: unknown video settings {sorted(unknown)}")
        return cls(image, KeyFramePolicy(**{k: spec[k] for k in fields if k in spec}))

    def encode(self, path: str | os.PathLike, text: str | None = None) -> np.ndarray:
        """A video file -> (F, tokens_per_image) int64 codes of its key frames."""
        return self.image.encode(self.key_frames(path, text)[1])

    def key_frames(self, path: str | os.PathLike, text: str | None = None) -> tuple[list[int], list[Image.Image]]:
        """The chosen frame numbers and the frames themselves."""
        p = Path(path)
        scenes, total = self.detect_scenes(p)
        if self.policy.selection == "mio-release":
            indices = release_frames(scenes, total)
        else:
            indices = choose_frames(scenes, total, self.policy.frame_count(text, len(scenes)))
        return indices, read_frames(p, indices)

    def detect_scenes(self, path: Path) -> tuple[list[tuple[int, int]], int]:
        """[(start, end)) frame ranges of the scenes, and the number of decodable frames."""
        if not path.is_file():
            raise FileNotFoundError(f"video file {path} does not exist")
        total = count_frames(path)
        from scenedetect import ContentDetector, detect

        try:
            found = detect(
                str(path),
                ContentDetector(threshold=self.policy.threshold, min_scene_len=self.policy.min_scene_len),
                backend="pyav",
            )
        except Exception as err:  # scenedetect wraps decoder failures in several types
            raise MioUserError(f"video file {path}: scene detection failed: {err}") from err
        scenes = [(start.frame_num, min(end.frame_num, total)) for start, end in found]
        return [(s, e) for s, e in scenes if e > s], total


def choose_frames(scenes: list[tuple[int, int]], total: int, n: int) -> list[int]:
    """Sorted distinct frame numbers in [0, total): scene middles first, then the least covered.

    With fewer than two scenes (no cut found) this is uniform sampling: n frames at the middles of
    n equal stretches.
    """
    n = min(n, total)
    if n <= 0:
        return []
    if len(scenes) < 2:
        return sorted({int((i + 0.5) * total / n) for i in range(n)})
    middles = [(s + e - 1) // 2 for s, e in scenes]
    if len(middles) >= n:
        picks = np.round(np.linspace(0, len(middles) - 1, n)).astype(int)
        return [middles[i] for i in picks]
    chosen = list(middles)
    frames = np.arange(total)
    while len(chosen) < n:
        gap = np.abs(frames[:, None] - np.asarray(chosen)[None, :]).min(axis=1)  # (total,)
        chosen.append(int(gap.argmax()))  # farthest from every chosen frame; ties: the earliest
    return sorted(chosen)


def release_frames(scenes: list[tuple[int, int]], total: int) -> list[int]:
    """MIO's released frames: PySceneDetect's middle frame of every scene (``save_images`` with one
    image: ``start + len // 2``), however many; with no cut, frames 0, k, 2k, ... for k = total // 10."""
    if len(scenes) < 2:  # no cut (a detector may report the whole video as one scene)
        return list(range(0, total, max(1, total // 10)))
    return [s + (e - s) // 2 for s, e in scenes]


def count_frames(path: Path) -> int:
    """Decodable video frames of a file (decodes them: container headers may lie)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MioUserError(f"video file {path} has no video stream")
            total = sum(1 for _ in container.decode(container.streams.video[0]))
    except av.FFmpegError as err:
        raise MioUserError(f"video file {path} cannot be decoded: {err}") from err
    if total == 0:
        raise MioUserError(f"video file {path} has no decodable frames")
    return total


def read_frames(path: Path, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (sorted) as RGB images, decoding the file once."""
    import av

    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    found[i] = frame.to_image().convert("RGB")
                if len(found) == len(wanted):
                    break
    except av.FFmpegError as err:
        raise MioUserError(f"video file {path} cannot be decoded: {err}") from err
    missing = sorted(wanted - set(found))
    if missing:
        raise MioUserError(f"video file {path}: frames {missing} could not be decoded")
    return [found[i] for i in indices]
