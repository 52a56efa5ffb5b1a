"""Every recipe runs: the demo's recipes on the bundled samples, and each public-layout recipe on a
small input made here in its layout, with only its paths edited (what a user does)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from prepare_support import write_tar

from mio.data.prepare import prepare
from mio.data.recipe import Recipe
from mio.data.shards import file_sha256, iter_shard, list_shards
from mio.segments import Image, Speech, Text, Video

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "data_recipes"
SAMPLES = RECIPES / "samples"
TINY = ROOT / "tokenizers" / "tiny"
PHOTOS = sorted((SAMPLES / "images").glob("*.jpg"))


def _stored(out: Path) -> list:
    return [s for shard in list_shards(out) for s in iter_shard(shard)]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines()]


def _check_manifest(m: dict, out: Path) -> None:
    assert m["samples"] + sum(m["skipped"].values()) == m["seen"]
    assert [s["shard"] for s in m["shards"]] == [Path(p).name for p in list_shards(out)]
    for s in m["shards"]:
        assert file_sha256(out / s["shard"]) == s["sha256"]
    for spec in m["tokenizers"].values():
        assert Path(spec["path"]).is_file() and len(spec["sha256"]) == 64
    assert m["recipe"]["sha256"] == file_sha256(m["recipe"]["path"])


# --- the demo's recipes on the bundled samples ---------------------------------------------
SUBSETS = {"speech_text": 4, "sft": 2}  # fewer speech clips: the tiny speech codec is the slow part


def _demo_recipe(name: str, tmp: Path) -> tuple[Path, list[dict]]:
    """The demo recipe and its rows; for the slow speech ones, a copy reading a subset of the
    bundled rows (for SFT: two of every task family) from the bundled files."""
    recipe = RECIPES / "demo" / f"{name}.yaml"
    raw = yaml.safe_load(recipe.read_text())
    if name == "grounding":  # Visual Genome's layout: one JSON array, one row per photo
        return recipe, json.loads((SAMPLES / "grounding" / "region_descriptions.json").read_text())
    rows = _rows(Path(raw["input"]).name)
    if name not in SUBSETS:
        return recipe, rows
    if name == "sft":
        per_task: Counter = Counter()
        keep = []
        for r in rows:
            if per_task[r["task"]] < SUBSETS[name]:
                keep.append(r)
                per_task[r["task"]] += 1
        rows = keep
    else:
        rows = rows[:SUBSETS[name]]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw["input"] = {"paths": str(tmp / "rows.jsonl"), "media_root": str(SAMPLES)}
    copy = tmp / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(raw))
    return copy, rows


@pytest.mark.parametrize("name", sorted(p.stem for p in (RECIPES / "demo").glob("*.yaml")))
def test_demo_recipe_on_bundled_samples(name, tmp_path):
    recipe, rows = _demo_recipe(name, tmp_path)
    m = prepare(recipe, tmp_path / "out", tokenizer_dir=TINY)
    _check_manifest(m, tmp_path / "out")
    assert m["skipped"] == {} and m["samples"] == m["seen"] == len(rows)
    stored = _stored(tmp_path / "out")
    assert len(stored) == len(rows)
    first, row = stored[0], rows[0]
    if name == "image_text":
        assert isinstance(first.segments[0], Image) and first.segments[1].text == row["caption"]
        assert first.segments[0].codes.shape == (32,)
    elif name == "speech_text":
        assert isinstance(first.segments[0], Speech) and first.segments[1].text == row["text"]
        seconds = sf.info(SAMPLES / row["audio"]).duration
        assert first.segments[0].codes.shape == (4, int(np.ceil(seconds * 50 - 1e-6)))
    elif name == "video_text":
        assert isinstance(first.segments[0], Video) and 4 <= len(first.segments[0].frames) <= 8
    elif name == "text":
        assert [s.segments[0].text for s in stored] == [r["text"] for r in rows]
    elif name in ("interleaved", "video_interleaved"):
        kinds = [("text" if isinstance(s, Text) else "media") for s in first.segments]
        assert kinds == [("text" if "text" in d else "media") for d in row["segments"]]
    elif name == "grounding":
        assert isinstance(first.segments[0], Image) and [b.phrase for b in first.segments[1:]] == \
            [r["phrase"] for r in row["regions"]]
    else:
        assert {s.task for s in stored} == {r["task"] for r in rows}
        assert all(s.turns and s.turns[-1].role == "assistant" for s in stored)


# --- public layouts -------------------------------------------------------------------------
def _edited(name: str, tmp: Path, paths, media_root: Path | None = None) -> Path:
    """The shipped recipe with its input paths (and media root) edited, nothing else."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    raw["input"]["paths"] = paths
    if media_root is not None:
        raw["input"]["media_root"] = str(media_root)
    out = tmp / f"{name}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def _run(recipe: Path, tmp: Path) -> tuple[dict, list]:
    m = prepare(recipe, tmp / "out", tokenizer_dir=TINY)
    _check_manifest(m, tmp / "out")
    return m, _stored(tmp / "out")


def test_img2dataset_shards(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"{s:05d}.tar", [
            (f"{s}{i:04d}", {"jpg": PHOTOS[s * 3 + i].read_bytes(), "txt": f"photo {s} {i}".encode(),
                             "json": json.dumps({"caption": f"photo {s} {i}", "url": "x"}).encode()})
            for i in range(2)] + [(f"{s}9999", {"jpg": PHOTOS[9].read_bytes(),
                                                "json": json.dumps({"caption": f"json caption {s}"}).encode()})])
    m, stored = _run(_edited("image_text_img2dataset", tmp_path, str(tmp_path / "{00000..00001}.tar")), tmp_path)
    assert m["samples"] == 6 and m["skipped"] == {}
    assert [s.segments[1].text for s in stored] == ["photo 0 0", "photo 0 1", "json caption 0",
                                                     "photo 1 0", "photo 1 1", "json caption 1"]


def test_urls_list_of_shards(tmp_path):
    write_tar(tmp_path / "a.tar", [("k1", {"png": b"", "txt": b"empty image"}), ("k2", {"jpg": PHOTOS[0].read_bytes(),
                                                                                   "txt": b"astronaut"})])
    (tmp_path / "list.txt").write_text(f"# shards\nfile://{tmp_path / 'a.tar'}\n")
    raw = yaml.safe_load((RECIPES / "image_text_img2dataset.yaml").read_text())
    raw["input"] = {"format": "urls", "paths": str(tmp_path / "list.txt")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    m, stored = _run(tmp_path / "r.yaml", tmp_path)
    assert m["skipped"] == {"empty_file": 1} and [s.segments[1].text for s in stored] == ["astronaut"]


def test_journeydb_jsonl(tmp_path):
    (tmp_path / "imgs" / "000").mkdir(parents=True)
    shutil.copy(PHOTOS[0], tmp_path / "imgs" / "000" / "a.jpg")
    shutil.copy(PHOTOS[1], tmp_path / "imgs" / "000" / "b.jpg")
    rows = [{"img_path": "./000/a.jpg", "prompt": "a prompt", "Task2": {"Caption": "a caption"}},
            {"img_path": "./000/b.jpg", "prompt": "only a prompt"}]
    (tmp_path / "anno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, stored = _run(_edited("image_text_journeydb", tmp_path, str(tmp_path / "anno.jsonl"), tmp_path / "imgs"),
                     tmp_path)
    assert [s.segments[1].text for s in stored] == ["a caption", "only a prompt"]


def test_image_folder(tmp_path):
    for i, sub in enumerate(["x", "x", "y/z"]):
        (tmp_path / "pairs" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(PHOTOS[i], tmp_path / "pairs" / sub / f"p{i}.jpg")
        (tmp_path / "pairs" / sub / f"p{i}.txt").write_text(f"caption {i}")
    (tmp_path / "pairs" / "x" / "lonely.txt").write_text("no image")
    m, stored = _run(_edited("image_text_folder", tmp_path, str(tmp_path / "pairs")), tmp_path)
    assert m["skipped"] == {"missing_field": 1}
    assert [s.segments[1].text for s in stored] == ["caption 0", "caption 1", "caption 2"]


def test_refinedweb_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    long = ["word " * 60, "other words " * 30]
    pq.write_table(pa.table({"content": long + ["too short"], "url": ["u1", "u2", "u3"]}),
                   tmp_path / "train-00000.parquet")
    m, stored = _run(_edited("text_refinedweb", tmp_path, str(tmp_path / "train-*.parquet")), tmp_path)
    assert m["skipped"] == {"text_too_short": 1} and [s.segments[0].text for s in stored] == long


def test_obelics_parquet(tmp_path):
    """A dead link drops the image, not the document (counted by reason); drop_document restores
    the all-or-nothing rule."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "images").mkdir()
    shutil.copy(PHOTOS[2], tmp_path / "images" / "p.jpg")
    pq.write_table(pa.table({
        "texts": [["An intro paragraph about photos.", None, "A closing remark."],
                  ["A long paragraph about a remote picture.", None, None, "Its end."], ["Short:", None]],
        "images": [[None, "p.jpg", None], [None, "https://example.org/x.jpg", "gone.jpg", None],
                   [None, "https://example.org/y.jpg"]]}), tmp_path / "train-0.parquet")
    recipe = _edited("interleaved_obelics", tmp_path, str(tmp_path / "train-*.parquet"), tmp_path / "images")
    m, stored = _run(recipe, tmp_path)
    assert m["skipped"] == {"text_too_short": 1} and m["dropped_media"] == {"missing_file": 1, "remote_media": 1}
    assert [type(s).__name__ for s in stored[0].segments] == ["Text", "Image", "Text"]
    assert [s.text for s in stored[1].segments] == ["A long paragraph about a remote picture.", "Its end."]
    raw = yaml.safe_load(recipe.read_text())
    raw["filters"]["bad_media_in_document"] = "drop_document"
    recipe.write_text(yaml.safe_dump(raw))
    shutil.rmtree(tmp_path / "out")
    m, stored = _run(recipe, tmp_path)
    assert m["skipped"] == {"remote_media": 1, "text_too_short": 1} and m["dropped_media"] == {} and len(stored) == 1


def test_mmc4_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(PHOTOS[3], tmp_path / "images" / "i.jpg")
    row = {"text_list": ["First sentence.", "Second sentence."],
           "image_info": [{"image_name": "i.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}
    (tmp_path / "docs_shard_0_v2.jsonl").write_text(json.dumps(row) + "\n")
    m, stored = _run(_edited("interleaved_mmc4", tmp_path, str(tmp_path / "docs_shard_*_v2.jsonl"),
                             tmp_path / "images"), tmp_path)
    segs = stored[0].segments
    assert [type(s).__name__ for s in segs] == ["Text", "Image", "Text"]
    assert segs[0].text == "First sentence." and segs[2].text == " Second sentence."


def test_webvid_csv(tmp_path):
    (tmp_path / "videos" / "001").mkdir(parents=True)
    shutil.copy(SAMPLES / "videos" / "cafe.mp4", tmp_path / "videos" / "001" / "42.mp4")
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerow(["42", "https://x", "PT00H00M03S", "001", "a cat, a coffee and some grass"])
        w.writerow(["43", "https://x", "PT00H00M03S", "001", "never downloaded"])
    m, stored = _run(_edited("video_text_webvid", tmp_path, str(tmp_path / "results.csv"), tmp_path / "videos"),
                     tmp_path)
    assert m["skipped"] == {"missing_file": 1}
    assert isinstance(stored[0].segments[0], Video) and stored[0].segments[1].text.startswith("a cat")


def test_video_interleaved_jsonl(tmp_path):
    shutil.copy(SAMPLES / "videos" / "space.mp4", tmp_path / "clip.mp4")
    row = {"segments": [{"text": "First we see space."}, {"video": "clip.mp4"}, {"text": "Then it ends."}]}
    (tmp_path / "doc.jsonl").write_text(json.dumps(row) + "\n")
    m, stored = _run(_edited("video_interleaved_jsonl", tmp_path, str(tmp_path / "*.jsonl")), tmp_path)
    assert [type(s).__name__ for s in stored[0].segments] == ["Text", "Video", "Text"]
    assert m["tokenizers"].keys() == {"video"}


def test_libriheavy_cuts(tmp_path):
    clips = [sf.read(SAMPLES / "speech" / f"clip0{i}.wav", dtype="float32")[0] for i in (1, 2, 3)]
    recording = np.concatenate(clips)
    (tmp_path / "ll" / "medium").mkdir(parents=True)
    sf.write(tmp_path / "ll" / "medium" / "rec.flac", recording, 16000)
    starts = np.cumsum([0] + [len(c) for c in clips[:-1]]) / 16000
    source = {"type": "file", "source": "medium/rec.flac", "channels": [0]}
    cuts = [{"id": f"c{i}", "start": float(starts[i]), "duration": len(clips[i]) / 16000, "channel": 0,
             "supervisions": [{"text": f"lower {i}", "custom": {"texts": [f"Cased {i}.", f"lower {i}"]}}],
             "recording": {"id": "rec", "sources": [source], "sampling_rate": 16000}} for i in range(3)]
    cuts.append({**cuts[0], "id": "over", "start": 1.0, "duration": len(recording) / 16000})
    with gzip.open(tmp_path / "cuts.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(c) + "\n" for c in cuts))
    m, stored = _run(_edited("speech_text_libriheavy", tmp_path, str(tmp_path / "cuts.jsonl.gz"), tmp_path / "ll"),
                     tmp_path)
    assert m["skipped"] == {"bad_field": 1}  # the window past the recording's end
    assert [s.segments[1].text for s in stored] == ["Cased 0.", "Cased 1.", "Cased 2."]
    assert [s.segments[0].codes.shape[1] for s in stored] == [int(np.ceil(len(c) / 320)) for c in clips]


def test_chatml_and_llava_sft(tmp_path):
    shutil.copy(PHOTOS[4], tmp_path / "a.jpg")
    chat = [{"task": "image_qa", "messages": [
        {"role": "user", "content": [{"image": "a.jpg"}, {"text": "What is this?"}]},
        {"role": "assistant", "content": "A cup of coffee."}]},
        {"messages": [{"role": "assistant", "content": "no user turn"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    m, stored = _run(_edited("sft_chatml", tmp_path, str(tmp_path / "chat.jsonl")), tmp_path)
    assert m["skipped"] == {"bad_conversation": 1} and stored[0].task == "image_qa"
    assert isinstance(stored[0].turns[0].content[0], Image) and stored[0].turns[1].content[0].text == "A cup of coffee."
    llava = [{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A cup."},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "White."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    shutil.rmtree(tmp_path / "out")
    m, stored = _run(_edited("sft_llava", tmp_path, str(tmp_path / "llava.json"), tmp_path), tmp_path)
    turns = stored[0].turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert isinstance(turns[0].content[0], Image) and turns[0].content[1].text == "What is on the table?"


def test_language_filter_and_every_shipped_recipe_loads(tmp_path):
    for path in sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "demo").glob("*.yaml")):
        r = Recipe.load(path)
        assert r.shard_size >= 1 and r.input.format
    rows = [{"text": f"text {i}", "meta": {"lang": lang}} for i, lang in enumerate(["en", "de", "en", None])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text("data_type: text\ninput: t.jsonl\nfields: {language: meta.lang}\n"
                                     "filters: {languages: [en]}\n")
    m = prepare(tmp_path / "r.yaml", tmp_path / "out")
    assert m["samples"] == 2 and m["skipped"] == {"language": 2}
