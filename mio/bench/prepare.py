"""`mio bench prepare`: what `mio prepare` costs around its tokenizers, measured on the real path
(`mio.data.prepare.prepare` over the shipped recipes, tiny tokenizers), each beside its floor.

- ``libriheavy``: a 10-minute synthetic LibriVox-like recording (FLAC) and lhotse cuts of 5-15 s
  into it, through `data_recipes/speech_text_libriheavy.yaml`: the bytes the process read
  (``/proc/self/io`` rchar) per second of kept audio, beside the windows' own share of the file
  (the floor); ``read_over_window`` is their ratio (target <= 2). ``whole_file_over_window`` is
  what reading each window's whole recording would cost (computed, for scale).
- ``busy``: a tiny image-text prepare over the bundled photos with 2 media workers: the share of
  the time (from the tokenizer's first call on) that the tokenizer was encoding (target >= 0.9),
  rows per second, and the tokenizer alone on the same decoded images (its ceiling).

Takes about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from mio.assets import DATA_RECIPES, TOKENIZER_SPECS
from mio.data.prepare import prepare
from mio.data.progress import Meter
from mio.media import read_image
from mio.tokenizers.media_tokenizers import MediaTokenizers, SpecSource
from mio.tokenizers.spec import seeded_generator
from mio.tokenizers.speech import synthetic_speechlike

RECIPES = DATA_RECIPES
TINY = TOKENIZER_SPECS / "tiny"


def bench_prepare(recording_s: float = 600.0, windows: int = 12, rows: int = 256, workers: int = 2) -> dict:
    with tempfile.TemporaryDirectory(prefix="mio-bench-prepare-") as tmp:
        return {"bench": "prepare", "load_average_1min": round(os.getloadavg()[0], 2),
                "libriheavy": libriheavy_reads(Path(tmp) / "libriheavy", recording_s, windows),
                "busy": tokenizer_busy(Path(tmp) / "busy", rows, workers)}


def _rchar() -> int:
    """Bytes this process has read so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def _edited_recipe(name: str, folder: Path, **input_keys: str) -> Path:
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    raw["input"].update(input_keys)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def libriheavy_reads(folder: Path, recording_s: float, windows: int) -> dict:
    rate = 16000
    rng = np.random.default_rng(0)
    source = "download/librilight/medium/100/chapter_01.flac"  # Libriheavy's source layout
    (folder / Path(source).parent).mkdir(parents=True)
    wave = synthetic_speechlike(1, int(recording_s * rate), rate, seeded_generator(0))[0].numpy()
    sf.write(folder / source, wave, rate, subtype="PCM_16")
    lengths = rng.uniform(5.0, 15.0, windows)
    starts = np.sort(rng.choice(np.arange(0, int(recording_s - 15)), windows, replace=False)).astype(float)
    cuts = [{"id": f"cut{i}", "start": float(s), "duration": round(float(d), 2), "channel": 0,
             "supervisions": [{"text": f"window {i}", "custom": {"texts": [f"Window {i}.", f"window {i}"]}}],
             "recording": {"id": "chapter_01", "sources": [{"type": "file", "source": source, "channels": [0]}],
                           "sampling_rate": rate}} for i, (s, d) in enumerate(zip(starts, lengths))]
    with gzip.open(folder / "libriheavy_cuts_bench.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(c) + "\n" for c in cuts))
    recipe = _edited_recipe("speech_text_libriheavy", folder, paths=str(folder / "libriheavy_cuts_bench.jsonl.gz"),
                            media_root=str(folder))
    before = _rchar()
    manifest = prepare(recipe, folder / "out", tokenizer_dir=TINY)
    read = _rchar() - before
    kept_s = float(sum(c["duration"] for c in cuts))
    size = (folder / source).stat().st_size
    window_bytes = size * kept_s / recording_s
    return {"samples": manifest["samples"], "recording_s": recording_s, "recording_bytes": size,
            "kept_audio_s": round(kept_s, 2),
            "read_bytes_per_kept_audio_s": round(read / kept_s),
            "window_bytes_per_kept_audio_s": round(window_bytes / kept_s),
            "read_over_window": round(read / window_bytes, 3),
            "whole_file_over_window": round(windows * size / window_bytes, 1)}


def tokenizer_busy(folder: Path, rows: int, workers: int) -> dict:
    folder.mkdir(parents=True)
    samples = RECIPES / "samples"
    bundled = [json.loads(line) for line in (samples / "image_text.jsonl").read_text().splitlines()]
    (folder / "rows.jsonl").write_text("".join(json.dumps(bundled[i % len(bundled)]) + "\n" for i in range(rows)))
    recipe = _edited_recipe("image_text_folder", folder, format="jsonl", paths=str(folder / "rows.jsonl"),
                            media_root=str(samples))
    raw = yaml.safe_load(recipe.read_text())
    raw.update(fields={"image": "image", "text": "caption"}, workers=workers, batch_size=32, shard_size=rows)
    recipe.write_text(yaml.safe_dump(raw))
    media = MediaTokenizers({"image": SpecSource(str(TINY / "seed.yaml"), "bench")})
    tok = media.get("image")  # built before the clock starts (prepare shares it: same spec content)
    meter = Meter()
    start = time.perf_counter()
    prepare(recipe, folder / "out", tokenizer_dir=TINY, meter=meter)
    seconds, busy = time.perf_counter() - start, meter.busy()
    images = [read_image(samples / r["image"], r["image"]) for r in bundled]
    images = [images[i % len(images)] for i in range(rows)]
    alone_start = time.perf_counter()
    for i in range(0, rows, 32):
        tok.encode(images[i:i + 32])
    alone = rows / (time.perf_counter() - alone_start)
    return {"rows": rows, "workers": workers, "tokenizer_busy": round(busy, 3),
            "prepare_rows_per_s": round(rows / seconds, 2), "tokenizer_alone_images_per_s": round(alone, 2),
            "prepare_over_tokenizer_alone": round(rows / seconds / alone, 3)}
