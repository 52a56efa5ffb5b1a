"""Make the small bundled raw samples of ``data_recipes/samples/`` (run once; the outputs are committed).

The demo and the data recipes' tests read these files; nothing here is imported by ``mio``.

Requirements (only for a developer re-making the bundle, not dependencies of ``mio``)::

    apt-get install espeak-ng                      # eSpeak NG 1.51 made the committed clips
    pip install scikit-image av numpy pillow soundfile scipy

Run from the repository root::

    python data_recipes/samples/make_samples.py            # rewrites data_recipes/samples/
    python data_recipes/samples/make_samples.py --out DIR  # writes elsewhere (e.g. to compare)

What it writes (paths inside the JSONL files are relative to this folder):

- ``images/*.jpg``: 16 real photographs shipped inside scikit-image (``skimage.data``, no network),
  square crops resized to 224x224 RGB, JPEG quality 85; ``image_text.jsonl`` pairs each with a caption.
- ``speech/*.wav``: 16 sentences spoken by espeak-ng (voice, speed and pitch drawn from a seeded
  generator), silence trimmed, 16 kHz mono 16-bit, 1.5-3.5 s; ``speech_text.jsonl`` holds their text.
- ``videos/*.mp4``: 4 H.264 clips, 224x224 at 8 fps, 3 s: three scenes of 1 s, each a slow pan or
  zoom over a different photograph, with hard cuts between them; ``video_text.jsonl`` describes them.
- ``interleaved.jsonl`` (6 text+image documents), ``video_interleaved.jsonl`` (2 text+video
  documents), ``text.jsonl`` (16 paragraphs), ``sft.jsonl`` (conversations of 7 task families).
- ``README.md``: the source and license of every photograph, as scikit-image states them.

Every choice that could vary is drawn from ``random.Random(SEED)``, so two runs with the same
versions of espeak-ng, Pillow and libx264 give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly
from skimage import data as skdata

SEED = 20240926
IMAGE_SIZE = 224
JPEG_QUALITY = 85
SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050  # espeak-ng always writes 22.05 kHz
MIN_SECONDS, MAX_SECONDS = 1.5, 3.5
VIDEO_FPS = 8
FRAMES_PER_SCENE = 8  # 1 s per scene, 3 scenes -> 3 s per video
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- photographs


@dataclass(frozen=True)
class Photo:
    """A photograph of skimage.data with the words scikit-image uses for its origin and license."""

    loader: Callable[[], np.ndarray]
    skimage_name: str
    source: str
    license: str


PHOTOS: dict[str, Photo] = {
    "astronaut": Photo(skdata.astronaut, "astronaut", "NASA Great Images database (Eileen Collins)",
                       "no known copyright restrictions, released into the public domain"),
    "chelsea": Photo(skdata.chelsea, "chelsea", "Stefan van der Walt",
                     "no copyright restrictions, CC0 by the photographer"),
    "coffee": Photo(skdata.coffee, "coffee", "Rachel Michetti, courtesy of Pikolo Espresso Bar",
                    "no copyright restrictions, CC0 by the photographer"),
    "rocket": Photo(skdata.rocket, "rocket", "SpaceX Photos (DSCOVR launch on Falcon 9)",
                    "released into the public domain by SpaceX"),
    "hubble": Photo(skdata.hubble_deep_field, "hubble_deep_field", "HubbleSite, NASA (Hubble eXtreme Deep Field)",
                    "captured by NASA, may be freely used in the public domain"),
    "retina": Photo(skdata.retina, "retina", "Wikimedia Commons, Mikael Haggstrom",
                    "CC0 1.0 Universal Public Domain Dedication"),
    "ihc": Photo(skdata.immunohistochemistry, "immunohistochemistry",
                 "Center for Microscopy And Molecular Imaging (CMMI)", "no known copyright restrictions"),
    "camera": Photo(skdata.camera, "camera", "Lav Varshney", "no copyright restrictions, CC0 by the photographer"),
    "coins": Photo(skdata.coins, "coins", "Brooklyn Museum Collection (Greek coins from Pompeii)",
                   "no known copyright restrictions"),
    "text": Photo(skdata.text, "text", "Wikipedia, File:Corner.png",
                  "no known copyright restrictions, released into the public domain"),
    "brick": Photo(skdata.brick, "brick", "CC0Textures (Bricks25), perspective-corrected by scikit-image",
                   "Creative Commons CC0"),
    "grass": Photo(skdata.grass, "grass", "DeviantArt, linolafett (Grass 01)", "Creative Commons CC0"),
    "gravel": Photo(skdata.gravel, "gravel", "CC0Textures (Gravel04)", "Creative Commons CC0"),
}


@dataclass(frozen=True)
class ImageSample:
    """One bundled image: a square crop (left, top, side in source pixels) of a photograph."""

    name: str
    photo: str
    crop: tuple[int, int, int]
    caption: str


IMAGES: list[ImageSample] = [
    ImageSample("astronaut", "astronaut", (0, 0, 512), "an astronaut in an orange suit smiling beside a flag"),
    ImageSample("face", "astronaut", (110, 0, 200), "close up of a smiling woman with short brown hair"),
    ImageSample("shuttle", "astronaut", (330, 0, 180), "a small model of the space shuttle on a plain background"),
    ImageSample("cat", "chelsea", (60, 0, 300), "close up of a tabby cat with green eyes"),
    ImageSample("coffee", "coffee", (150, 0, 400), "a cup of espresso on a red saucer with a spoon"),
    ImageSample("rocket", "rocket", (100, 0, 427), "a white rocket on the launch pad at dusk"),
    ImageSample("galaxies", "hubble", (0, 0, 872), "many distant galaxies scattered across a black sky"),
    ImageSample("retina", "retina", (0, 0, 1411), "a red fundus photograph of a human retina"),
    ImageSample("tissue", "ihc", (0, 0, 512), "stained tissue under a microscope in brown and blue"),
    ImageSample("launchpad", "rocket", (180, 250, 177), "bright lamps at the base of a launch tower at dusk"),
    ImageSample("cameraman", "camera", (0, 0, 512), "a man in a dark coat using a camera on a tripod"),
    ImageSample("coins", "coins", (40, 0, 303), "rows of ancient greek coins on a dark background"),
    ImageSample("handwriting", "text", (0, 0, 172), "handwritten math symbols on a sheet of paper"),
    ImageSample("brick", "brick", (0, 0, 512), "a grey brick wall seen at an angle"),
    ImageSample("grass", "grass", (0, 0, 512), "a close view of grass blades in black and white"),
    ImageSample("gravel", "gravel", (0, 0, 512), "a patch of small grey gravel stones"),
]


def load_rgb(photo: Photo) -> Image.Image:
    """The photograph as 8-bit RGB (grey ones are replicated to three channels)."""
    return Image.fromarray(photo.loader()).convert("RGB")


def crop_square(image: Image.Image, left: int, top: int, side: int) -> Image.Image:
    if left + side > image.width or top + side > image.height:
        raise ValueError(f"crop {(left, top, side)} leaves the {image.width}x{image.height} photograph")
    return image.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def write_images(out: Path) -> list[dict[str, str]]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in IMAGES:
        image = crop_square(load_rgb(PHOTOS[sample.photo]), *sample.crop)
        rel = f"images/{sample.name}.jpg"
        image.save(out / rel, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        rows.append({"image": rel, "caption": sample.caption})
    return rows


# ---------------------------------------------------------------- speech

SENTENCES: list[str] = [
    "the cat sleeps on the warm window sill",
    "please open the front door for me",
    "a red car drove down the quiet road",
    "we walked to the market this morning",
    "the rain stopped just before noon",
    "my brother plays the piano every evening",
    "turn left at the next corner",
    "the bread smells fresh and warm",
    "birds sing loudly in the old oak tree",
    "she reads a book by the river",
    "the last train leaves at seven",
    "coffee tastes better with a little milk",
    "the children laughed at the funny clown",
    "snow covered the hills overnight",
    "he fixed the bicycle in the garage",
    "the moon rose slowly over the sea",
]
VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029"]
VARIANTS = ["m1", "m3", "m7", "f2", "f3", "f4"]


@dataclass(frozen=True)
class Voice:
    """espeak-ng settings of one clip: voice+variant, words per minute, pitch (0-99)."""

    name: str
    speed: int
    pitch: int


def draw_voice(rng: random.Random) -> Voice:
    return Voice(f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}", rng.randint(145, 175), rng.randint(35, 65))


def speak(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng's 22.05 kHz mono clip of `text` as float32 in [-1, 1], shape (N,)."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch),
                        "-w", str(wav), text], check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    if rate != ESPEAK_RATE or audio.ndim != 1:
        raise ValueError(f"espeak-ng wrote {rate} Hz with shape {audio.shape}, expected {ESPEAK_RATE} Hz mono")
    return audio


def trim_silence(audio: np.ndarray, rate: int, pad_s: float = 0.08) -> np.ndarray:
    """Drop leading/trailing samples quieter than 2% of the peak, keeping `pad_s` of margin."""
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    pad = int(pad_s * rate)
    return audio[max(loud[0] - pad, 0): loud[-1] + pad + 1]


def to_16k(audio: np.ndarray) -> np.ndarray:
    """22.05 kHz -> 16 kHz (ratio 320/441), peak normalised to 0.9 so every clip has the same level."""
    resampled = resample_poly(audio, 320, 441).astype(np.float32)  # (N * 320 / 441,)
    return 0.9 * resampled / np.abs(resampled).max()


def write_speech(out: Path, rng: random.Random) -> tuple[list[dict[str, str]], list[Voice]]:
    (out / "speech").mkdir(parents=True, exist_ok=True)
    rows, voices = [], []
    for index, text in enumerate(SENTENCES, start=1):
        voice = draw_voice(rng)
        audio = to_16k(trim_silence(speak(text, voice), ESPEAK_RATE))
        seconds = len(audio) / SAMPLE_RATE
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise ValueError(f"clip {index} {text!r} lasts {seconds:.2f} s, outside {MIN_SECONDS}-{MAX_SECONDS} s")
        rel = f"speech/clip{index:02d}.wav"
        sf.write(out / rel, audio, SAMPLE_RATE, subtype="PCM_16")
        rows.append({"audio": rel, "text": text})
        voices.append(voice)
    return rows, voices


# ---------------------------------------------------------------- videos


@dataclass(frozen=True)
class VideoSample:
    """A video of three scenes, each a slow pan or zoom over one photograph."""

    name: str
    photos: tuple[str, str, str]
    text: str


VIDEOS: list[VideoSample] = [
    VideoSample("space", ("rocket", "hubble", "astronaut"),
                "a rocket waits on its launch pad, then distant galaxies fill a black sky, "
                "then an astronaut smiles in an orange suit"),
    VideoSample("cafe", ("chelsea", "coffee", "grass"),
                "a tabby cat looks into the camera, then a cup of espresso sits on a wooden table, "
                "then grass blades are seen up close"),
    VideoSample("studio", ("camera", "text", "brick"),
                "a man films with a camera on a tripod, then the view slides over handwritten symbols, "
                "then a grey brick wall is seen at an angle"),
    VideoSample("closeups", ("coins", "retina", "ihc"),
                "ancient coins lie in rows, then a red retina fills the frame, "
                "then stained tissue is shown under a microscope"),
]


def scene_boxes(width: int, height: int, rng: random.Random) -> list[tuple[float, float, float]]:
    """Square crop boxes (left, top, side) for the frames of one scene.

    A wide photograph is panned across (the square of its height slides left to right or back);
    a square one is zoomed in or out between its full extent and 75% of it, about its centre.
    """
    steps = np.linspace(0.0, 1.0, FRAMES_PER_SCENE)
    if width - height > 0.2 * height:
        side = float(height)
        lefts = steps * (width - side)
        if rng.random() < 0.5:
            lefts = lefts[::-1]
        return [(float(left), 0.0, side) for left in lefts]
    full = float(min(width, height))
    sides = full * (1.0 - 0.25 * steps)
    if rng.random() < 0.5:
        sides = sides[::-1]
    return [((width - s) / 2, (height - s) / 2, float(s)) for s in sides]


def scene_frames(photo: Image.Image, rng: random.Random) -> list[np.ndarray]:
    """The frames of one scene, each (224, 224, 3) uint8."""
    frames = []
    for left, top, side in scene_boxes(photo.width, photo.height, rng):
        box = (left, top, left + side, top + side)
        frames.append(np.asarray(photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC, box=box)))
    return frames


def encode_h264(frames: list[np.ndarray], path: Path) -> None:
    """Write (224, 224, 3) uint8 frames as an H.264 mp4 at VIDEO_FPS (single-threaded: same bytes every run)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = IMAGE_SIZE, IMAGE_SIZE, "yuv420p"
        stream.options = {"crf": "26", "preset": "medium", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_videos(out: Path, rng: random.Random) -> list[dict[str, str]]:
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for video in VIDEOS:
        frames = [f for name in video.photos for f in scene_frames(load_rgb(PHOTOS[name]), rng)]
        rel = f"videos/{video.name}.mp4"
        encode_h264(frames, out / rel)
        rows.append({"video": rel, "text": video.text})
    return rows


# ---------------------------------------------------------------- documents

TEXTS: list[str] = [
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes it boils at a lower temperature.",
    "The Moon orbits the Earth about once every twenty seven days. The same side of it always faces us.",
    "Bees collect nectar from flowers and turn it into honey. A single hive can hold tens of thousands of bees.",
    "A rainbow appears when sunlight is refracted inside raindrops. Red is always on the outer edge of the arc.",
    "Bread rises because yeast produces carbon dioxide. The gas is trapped in the dough and forms small bubbles.",
    "The Pacific is the largest ocean on Earth. It covers more area than all the land put together.",
    "Cats sleep for much of the day. They are most active at dawn and dusk.",
    "A bicycle chain moves power from the pedals to the rear wheel. Changing gears changes how far each turn of the pedals goes.",
    "Coffee beans are the roasted seeds of a fruit called the coffee cherry. Lighter roasts keep more of the fruit's acidity.",
    "Trains running on electricity take power from an overhead wire or a third rail.",
    "Telescopes collect more light than the human eye can. Larger mirrors let astronomers see fainter and more distant objects.",
    "Leaves are green because they contain chlorophyll. In autumn the chlorophyll breaks down and other colours show through.",
    "A library lends books for free to its members. Many libraries also lend music, films and tools.",
    "Bricks are made from clay that is shaped and then fired in a kiln. The heat makes them hard and durable.",
    "Sound travels faster in water than in air. In steel it travels faster still.",
    "Rockets carry their own oxygen, so their engines can work in the vacuum of space.",
]

INTERLEAVED: list[list[dict[str, str]]] = [
    [{"text": "The launch was scheduled for the evening. As the sun went down, floodlights lit the pad."},
     {"image": "images/rocket.jpg"},
     {"text": "Once in space, telescopes like Hubble can look back at galaxies whose light left them billions of years ago."},
     {"image": "images/galaxies.jpg"},
     {"text": "The next morning, only the empty tower and its lamps were left on the pad."},
     {"image": "images/launchpad.jpg"}],
    [{"text": "Our cat spends every morning on the kitchen chair."},
     {"image": "images/cat.jpg"},
     {"text": "She only moves when she hears the coffee machine, and she watches every cup being made."},
     {"image": "images/coffee.jpg"},
     {"text": "Then she goes back to sleep until lunch."}],
    [{"text": "Before her flight, the astronaut posed for her official portrait."},
     {"image": "images/astronaut.jpg"},
     {"text": "Beside her stood a model of the space shuttle she would pilot."},
     {"image": "images/shuttle.jpg"},
     {"text": "A close view of the portrait shows her smile."},
     {"image": "images/face.jpg"}],
    [{"text": "Eye doctors photograph the back of the eye to check the blood vessels."},
     {"image": "images/retina.jpg"},
     {"text": "Pathologists instead look at thin slices of tissue, stained so that different cells take different colours."},
     {"image": "images/tissue.jpg"}],
    [{"text": "Walking through the old town, we noticed how many textures a street has."},
     {"image": "images/brick.jpg"},
     {"text": "The walls were brick, the paths were covered in loose gravel,"},
     {"image": "images/gravel.jpg"},
     {"text": "and the small park at the end was thick with grass."},
     {"image": "images/grass.jpg"}],
    [{"text": "The museum's collection includes coins found at Pompeii, laid out in rows."},
     {"image": "images/coins.jpg"},
     {"text": "Outside, a photographer was setting up his camera on a tripod to film the square."},
     {"image": "images/cameraman.jpg"},
     {"text": "Later he filmed a teacher's notes, a page full of handwritten symbols."},
     {"image": "images/handwriting.jpg"}],
]

VIDEO_INTERLEAVED: list[list[dict[str, str]]] = [
    [{"text": "Our film about space begins on the ground, with a rocket on its pad, and then looks far away."},
     {"video": "videos/space.mp4"},
     {"text": "Back on Earth, the morning starts slowly: the cat wakes up, the coffee is poured, and the lawn outside is still wet."},
     {"video": "videos/cafe.mp4"},
     {"text": "From the sky to the kitchen table in a few seconds."}],
    [{"text": "This short reel follows a photographer at work, from his tripod to the notes and walls he films."},
     {"video": "videos/studio.mp4"},
     {"text": "The second reel moves closer, to coins, an eye and cells under the microscope."},
     {"video": "videos/closeups.mp4"},
     {"text": "Each scene lasts one second before the next one cuts in."}],
]


# ---------------------------------------------------------------- SFT conversations

CAPTION_PROMPTS = ["Describe this image briefly.", "What is in this picture?", "Write a short caption for this image."]
GENERATION_PROMPTS = ["Please generate an image of {}.", "Draw a picture of {}.", "Show me an image of {}."]
ASR_PROMPTS = ["Transcribe this speech.", "What does the speaker say?", "Write down what you hear."]
TTS_PROMPTS = ["Please read this aloud: {}", "Say the following sentence: {}", "Speak this out loud: {}"]

IMAGE_QA: list[tuple[str, str, str]] = [
    ("cat", "What color are the cat's eyes?", "The cat's eyes are green."),
    ("coffee", "What drink is in the cup?", "Espresso, served in a cup on a red saucer with a spoon."),
    ("rocket", "Is this photo taken during the day?", "No, it is taken at dusk: the sky is dark blue and the lights on the pad are on."),
    ("astronaut", "What is the person wearing?", "An orange spacesuit with mission patches on it."),
    ("tissue", "What colors is this tissue stained with?", "Brown and blue: brown where the protein is found, blue elsewhere."),
    ("coins", "What objects are shown here?", "Ancient coins, laid out in rows on a dark background."),
    ("cameraman", "What is the man doing?", "He is looking through a camera mounted on a tripod."),
    ("galaxies", "What does this image show?", "A deep view of space full of small, distant galaxies."),
]

CHATS: list[list[tuple[str, str]]] = [
    [("user", "Hello! Who are you?"),
     ("assistant", "Hello! I am MIO, an assistant that can understand and generate text, images, speech and video.")],
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("user", "Give me a tip for sleeping better."),
     ("assistant", "Keep a regular schedule: go to bed and get up at the same time every day, even on weekends.")],
    [("user", "How many legs does a spider have?"), ("assistant", "A spider has eight legs."),
     ("user", "And an insect?"), ("assistant", "An insect has six legs.")],
    [("user", "Translate 'good morning' into Spanish."), ("assistant", "Good morning in Spanish is 'buenos dias'.")],
    [("user", "What is twelve times twelve?"), ("assistant", "Twelve times twelve is one hundred and forty four.")],
]


def message(role: str, *content: dict[str, str]) -> dict[str, object]:
    return {"role": role, "content": list(content)}


def conversation(task: str, *messages: dict[str, object]) -> dict[str, object]:
    return {"task": task, "messages": list(messages)}


def sft_conversations(image_rows: list[dict[str, str]], speech_rows: list[dict[str, str]],
                      video_rows: list[dict[str, str]], rng: random.Random) -> list[dict[str, object]]:
    """Conversations of 7 families; captioning, generation, ASR and TTS use the exact bundled pairs."""
    rows = []
    for pair in image_rows:
        rows.append(conversation("image_captioning",
                                 message("user", {"image": pair["image"]}, {"text": rng.choice(CAPTION_PROMPTS)}),
                                 message("assistant", {"text": pair["caption"]})))
    for pair in image_rows:
        rows.append(conversation("image_generation",
                                 message("user", {"text": rng.choice(GENERATION_PROMPTS).format(pair["caption"])}),
                                 message("assistant", {"image": pair["image"]})))
    for pair in speech_rows:
        rows.append(conversation("asr",
                                 message("user", {"speech": pair["audio"]}, {"text": rng.choice(ASR_PROMPTS)}),
                                 message("assistant", {"text": pair["text"]})))
    for pair in speech_rows:
        rows.append(conversation("tts",
                                 message("user", {"text": rng.choice(TTS_PROMPTS).format(pair["text"])}),
                                 message("assistant", {"speech": pair["audio"]})))
    for name, question, answer in IMAGE_QA:
        rows.append(conversation("image_qa",
                                 message("user", {"image": f"images/{name}.jpg"}, {"text": question}),
                                 message("assistant", {"text": answer})))
    for pair in video_rows:
        rows.append(conversation("video_understanding",
                                 message("user", {"video": pair["video"]}, {"text": "What happens in this video?"}),
                                 message("assistant", {"text": pair["text"][0].upper() + pair["text"][1:] + "."})))
    for turns in CHATS:
        rows.append(conversation("chat", *(message(role, {"text": text}) for role, text in turns)))
    return rows


# ---------------------------------------------------------------- README


def readme(voices: list[Voice]) -> str:
    lines = [
        "# Bundled samples",
        "",
        "Small raw data for `mio demo` and the data recipes' tests, made by `make_samples.py` (its docstring",
        "lists what it needs; do not edit the outputs by hand, re-run the script). Paths in the JSONL files",
        "are relative to this folder.",
        "",
        "| file | rows | one row |",
        "|---|---|---|",
        '| `image_text.jsonl` | 16 | `{"image": "images/NAME.jpg", "caption": "..."}` (224x224 RGB JPEG) |',
        '| `speech_text.jsonl` | 16 | `{"audio": "speech/clipNN.wav", "text": "..."}` (16 kHz mono 16-bit, 1.5-3.5 s) |',
        '| `video_text.jsonl` | 4 | `{"video": "videos/NAME.mp4", "text": "..."}` (H.264, 224x224, 8 fps, 3 scenes of 1 s) |',
        '| `interleaved.jsonl` | 6 | `{"segments": [{"text": ...}, {"image": ...}, ...]}` |',
        '| `video_interleaved.jsonl` | 2 | `{"segments": [{"text": ...}, {"video": ...}, ...]}` |',
        '| `text.jsonl` | 16 | `{"text": "..."}` |',
        '| `sft.jsonl` | ' + str(len(IMAGES) * 2 + len(SENTENCES) * 2 + len(IMAGE_QA) + len(VIDEOS) + len(CHATS))
        + ' | `{"task": ..., "messages": [{"role": "user"\\|"assistant", "content": [{"text"\\|"image"\\|"speech"\\|"video": ...}]}]}` |',
        "",
        "SFT task families: `image_captioning`, `image_generation`, `asr`, `tts` (one conversation per pair of",
        "`image_text.jsonl` / `speech_text.jsonl`, with exactly their captions, texts and files), `image_qa`,",
        "`video_understanding`, `chat`.",
        "",
        "## Photographs",
        "",
        "All from the sample data that ships inside the scikit-image wheel (`skimage.data`, no download),",
        "square-cropped (left, top, side in source pixels) and resized to 224x224. Source and license are",
        "as scikit-image's documentation of each `skimage.data` function states them.",
        "",
        "| image | `skimage.data` | crop | source | license (as stated by scikit-image) |",
        "|---|---|---|---|---|",
    ]
    for sample in IMAGES:
        photo = PHOTOS[sample.photo]
        lines.append(f"| `images/{sample.name}.jpg` | `{photo.skimage_name}` | {sample.crop} | {photo.source} | {photo.license} |")
    lines += [
        "",
        "## Speech",
        "",
        "Our own sentences, synthesised with eSpeak NG 1.51 by `make_samples.py` (voice, speed and pitch drawn",
        "from its seeded generator), resampled from 22.05 kHz to 16 kHz, leading and trailing silence trimmed.",
        "",
        "| clip | voice | words/min | pitch |",
        "|---|---|---|---|",
    ]
    lines += [f"| `speech/clip{i:02d}.wav` | {v.name} | {v.speed} | {v.pitch} |" for i, v in enumerate(voices, start=1)]
    lines += [
        "",
        "## Videos",
        "",
        "Each video cuts between three photographs above (uncropped), one second each, with a slow pan",
        "(wide photographs) or zoom (square ones), encoded with libx264 through PyAV.",
        "",
        "| video | scenes |",
        "|---|---|",
    ]
    lines += [f"| `videos/{v.name}.mp4` | {', '.join(PHOTOS[p].skimage_name for p in v.photos)} |" for v in VIDEOS]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows), encoding="utf-8")


def check_words(kind: str, texts: list[str], low: int, high: int) -> None:
    """Captions and spoken sentences: lower-case ascii words and spaces, `low`-`high` words, no two alike."""
    for text in texts:
        if not re.fullmatch(r"[a-z]+( [a-z]+)*", text) or not low <= len(text.split()) <= high:
            raise ValueError(f"{kind} {text!r} must be {low}-{high} lower-case ascii words")
    if len(set(texts)) != len(texts):
        raise ValueError(f"two {kind}s are alike")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: this script's folder)")
    out: Path = parser.parse_args().out
    check_words("caption", [s.caption for s in IMAGES], 5, 12)
    check_words("sentence", SENTENCES, 4, 9)
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    image_rows = write_images(out)
    speech_rows, voices = write_speech(out, rng)
    video_rows = write_videos(out, rng)
    write_jsonl(out / "image_text.jsonl", image_rows)
    write_jsonl(out / "speech_text.jsonl", speech_rows)
    write_jsonl(out / "video_text.jsonl", video_rows)
    write_jsonl(out / "interleaved.jsonl", [{"segments": doc} for doc in INTERLEAVED])
    write_jsonl(out / "video_interleaved.jsonl", [{"segments": doc} for doc in VIDEO_INTERLEAVED])
    write_jsonl(out / "text.jsonl", [{"text": text} for text in TEXTS])
    write_jsonl(out / "sft.jsonl", sft_conversations(image_rows, speech_rows, video_rows, rng))
    (out / "README.md").write_text(readme(voices), encoding="utf-8")
    print(f"wrote samples to {out}")


if __name__ == "__main__":
    main()
