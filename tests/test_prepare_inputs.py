"""Inputs as they come: missing inputs are an error or a counted skip, one media decoder for
prepare / tokenize / generate (EXIF orientation, WAVs shorter than their header), windows of
long recordings read alone, pair filters on the original size, published archives (MMC4's
.jsonl.zip, JourneyDB's .jsonl.tgz), LLaVA's image-first order, recipe errors that say what to do."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image as PILImage
from prepare_support import write_tar

from mio.data.fields import MediaRef
from mio.data.media import Recordings
from mio.data.prepare import prepare
from mio.data.recipe import Recipe
from mio.data.shards import iter_shard, list_shards
from mio.data.tokenize_rows import recipe_tokenizers
from mio.media import read_audio
from mio.segments import Image, Text
from mio.tokenizers import tokenize_cli
from mio.tokenizers.media_tokenizers import MediaTokenizers, SpecSource

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "data_recipes"
TINY = ROOT / "tokenizers" / "tiny"
PHOTOS = sorted((RECIPES / "samples" / "images").glob("*.jpg"))
ORIENTATION = 0x0112


def _stored(out: Path) -> list:
    return [s for shard in list_shards(out) for s in iter_shard(shard)]


def _edited(name: str, tmp: Path, paths, media_root: Path | None = None, **extra) -> Path:
    """The shipped recipe with its input paths (and media root) edited, as a user does."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    raw["input"]["paths"] = paths
    if media_root is not None:
        raw["input"]["media_root"] = str(media_root)
    raw.update(extra)
    out = tmp / f"{name}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def test_missing_inputs_stop_the_run_or_are_counted_and_retried(tmp_path):
    for i in (0, 1, 3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"text": f"row of part {i}"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_type: text\ninput: 'part{0..3}.jsonl'\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 4 inputs are missing: .*part2.jsonl.*allow_missing"):
        prepare(recipe, tmp_path / "out")
    (tmp_path / "list.txt").write_text("part0.jsonl\nnot-here.tar\n")
    urls = tmp_path / "urls.yaml"
    urls.write_text("data_type: text\ninput: {format: urls, paths: list.txt}\n")
    with pytest.raises(FileNotFoundError, match="not-here.tar"):
        prepare(urls, tmp_path / "out")

    recipe.write_text("data_type: text\ninput: {paths: 'part{0..3}.jsonl', allow_missing: true}\n")
    m = prepare(recipe, tmp_path / "out")
    assert m["samples"] == 3 and m["skipped"] == {"missing_file": 1}
    assert [(f["input"], f["reason"]) for f in m["failed_inputs"]] == [("part2.jsonl", "missing_file")]
    (tmp_path / "part2.jsonl").write_text(json.dumps({"text": "the late download"}) + "\n")
    said: list[str] = []
    m = prepare(recipe, tmp_path / "out", progress=said.append)  # only the failed unit is redone
    assert said[0].endswith("3 units already done by an earlier run; retrying 1 whose input failed; preparing the rest")
    assert m["samples"] == 4 and m["skipped"] == {} and m["failed_inputs"] == []
    assert "the late download" in [s.segments[0].text for s in _stored(tmp_path / "out")]


@pytest.fixture(scope="module")
def sideways(tmp_path_factory):
    """An upright photo, and the same pixels stored turned with an EXIF tag that turns them back
    (what a phone writes). PNG: lossless, so both must give the very same codes."""
    d = tmp_path_factory.mktemp("exif")
    upright = PILImage.open(PHOTOS[3]).convert("RGB").resize((320, 240))
    exif = PILImage.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(PILImage.Transpose.ROTATE_90).save(d / "phone.png", exif=exif)
    return d, upright


def test_one_decoder_turns_exif_photos_upright_everywhere(sideways, tmp_path):
    d, upright = sideways
    media = MediaTokenizers({"image": SpecSource(str(TINY / "seed.yaml"), "test")})
    tok = media.get("image")
    want = tok.encode([upright])[0]
    assert not np.array_equal(want, tok.encode([PILImage.open(d / "phone.png").convert("RGB")])[0])
    assert np.array_equal(media.encode_file("image", d / "phone.png").codes, want)  # generate's prompt files
    assert tokenize_cli(str(TINY / "seed.yaml"), [str(d / "phone.png")]).__next__()["codes"] == want.tolist()
    shutil.copy(d / "phone.png", tmp_path / "phone.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "phone.png", "text": "a photo"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_type: image_text\ninput: rows.jsonl\ntokenizers: {image: seed.yaml}\n")
    prepare(recipe, tmp_path / "out", tokenizer_dir=TINY)
    assert np.array_equal(_stored(tmp_path / "out")[0].segments[0].codes, want)


def test_one_decoder_refuses_a_wav_shorter_than_its_header(tmp_path):
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32)
    sf.write(tmp_path / "whole.wav", tone, 16000, subtype="PCM_16")
    (tmp_path / "cut.wav").write_bytes((tmp_path / "whole.wav").read_bytes()[: 44 + 16000])
    rows = [{"audio": "whole.wav", "text": "whole"}, {"audio": "cut.wav", "text": "cut"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_type: speech_text\ninput: rows.jsonl\ntokenizers: {speech: speechtokenizer.yaml}\n")
    m = prepare(recipe, tmp_path / "out", tokenizer_dir=TINY)
    assert m["samples"] == 1 and m["skipped"] == {"unreadable_audio": 1}
    assert "cut.wav is truncated: its header declares 32000 bytes" in m["skipped_examples"][0]["detail"]
    record = next(tokenize_cli(str(TINY / "speechtokenizer.yaml"), [str(tmp_path / "cut.wav")]))
    assert "cut.wav is truncated: its header declares 32000 bytes" in record["error"]


def _rchar() -> int:
    """Bytes this process has read (Linux)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar"))
               .split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_long_recording_windows_read_only_their_bytes(tmp_path):
    rng = np.random.default_rng(0)
    recording = (0.2 * rng.standard_normal(60 * 16000)).astype(np.float32)  # 60 s: noise barely compresses
    path = tmp_path / "chapter.flac"
    sf.write(path, recording, 16000, subtype="PCM_16")
    whole = read_audio(path, "chapter", 16000)
    windows = [(12.0 * i + 1.0, 8.0) for i in range(4)] + [(58.0, 2.02)]  # 5-15 s cuts; the last ends 20 ms late
    recordings = Recordings()
    before = _rchar()
    waves = [recordings.read(MediaRef("speech", "chapter", path=path, start=s, duration=d), 16000, None)
             for s, d in windows]
    read = _rchar() - before
    recordings.close()
    for (s, d), wave in zip(windows, waves):
        start = int(round(s * 16000))
        assert np.array_equal(wave, whole[start: min(start + int(round(d * 16000)), len(whole))])
    assert len(waves[-1]) == 2 * 16000  # clamped to the recording, not dropped
    window_bytes = path.stat().st_size * sum(len(w) for w in waves) / len(recording)
    assert read <= 2 * window_bytes, (read, window_bytes)


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (an unknown name answers 404) while the test runs."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield served, f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no request lines in the test output
        pass


def test_remote_shards_that_fail_are_counted_and_retried(http_folder, tmp_path):
    served, base = http_folder
    photo = PHOTOS[0].read_bytes()
    for s in range(3):
        write_tar(served / f"{s:05d}.tar", [(f"{s}{i:03d}", {"jpg": photo, "txt": f"photo {s}-{i}".encode()})
                                            for i in range(4)])
    (served / "00001.tar").rename(tmp_path / "00001.tar")  # not there yet: the server answers 404
    with tarfile.open(served / "00002.tar") as tar:  # a cut inside the third sample's text: two whole samples before
        cut = tar.getmembers()[5].offset_data + 2
    urls = [f"{base}/00000.tar", f"{base}/00001.tar", f"pipe:head -c {cut} {served / '00002.tar'}; exit 3"]
    recipe = _edited("image_text_img2dataset", tmp_path, urls)
    m = prepare(recipe, tmp_path / "out", tokenizer_dir=TINY)
    assert m["skipped"] == {"missing_file": 1, "truncated_input": 1}
    assert m["samples"] == 4 + 2  # the whole shard, and the two samples before the pipe broke off
    failed = {f["input"]: f for f in m["failed_inputs"]}
    assert failed[urls[1]]["reason"] == "missing_file" and "22" in failed[urls[1]]["detail"]  # curl -f: HTTP error
    assert failed[urls[2]]["reason"] == "truncated_input" and "status 3" in failed[urls[2]]["detail"]
    assert "the 2 samples before it are kept" in failed[urls[2]]["detail"]

    (tmp_path / "00001.tar").rename(served / "00001.tar")  # the download arrives
    said: list[str] = []
    m = prepare(recipe, tmp_path / "out", tokenizer_dir=TINY, progress=said.append)
    assert "1 units already done by an earlier run; retrying 2 whose input failed" in said[0]
    assert m["samples"] == 4 + 4 + 2 and m["skipped"] == {"truncated_input": 1}
    assert [f["input"] for f in m["failed_inputs"]] == [urls[2]]


def test_pair_filters_judge_the_original_size_img2dataset_records(tmp_path):
    def jpg(size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        PILImage.open(PHOTOS[0]).convert("RGB").resize(size).save(buf, "JPEG")
        return buf.getvalue()

    def sample(key: str, text: str, original: tuple[int, int] | None) -> tuple[str, dict[str, bytes]]:
        meta = {"caption": text} | ({"original_width": original[0], "original_height": original[1]} if original else {})
        return key, {"jpg": jpg((256, 256)), "txt": text.encode(), "json": json.dumps(meta).encode()}

    write_tar(tmp_path / "00000.tar", [sample("0", "upscaled from a thumbnail", (100, 100)),
                                       sample("1", "padded from a panorama", (900, 300)),
                                       sample("2", "resized from a photo", (640, 480)), sample("3", "no record", None)])
    m = prepare(_edited("image_text_img2dataset", tmp_path, str(tmp_path / "00000.tar")), tmp_path / "out",
                tokenizer_dir=TINY)
    assert m["skipped"] == {"aspect_ratio": 1, "image_too_small": 1}
    assert "100x100 (original size) is below 224px" in json.dumps(m["skipped_examples"])
    assert [s.segments[1].text for s in _stored(tmp_path / "out")] == ["resized from a photo", "no record"]


def test_published_archives_mmc4_zip_and_journeydb_tgz(tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(PHOTOS[3], tmp_path / "images" / "i.jpg")
    doc = {"text_list": ["First sentence.", "Second sentence."],
           "image_info": [{"image_name": "i.jpg", "matched_text_index": 1}]}
    with zipfile.ZipFile(tmp_path / "docs_shard_0_v2.jsonl.zip", "w") as zf:
        zf.writestr("docs_shard_0_v2.jsonl", json.dumps(doc) + "\n" + json.dumps(doc) + "\n")
    m = prepare(_edited("interleaved_mmc4", tmp_path, str(tmp_path / "docs_shard_*_v2.jsonl.zip"), tmp_path / "images"),
                tmp_path / "mmc4", tokenizer_dir=TINY)
    assert m["samples"] == 2 and m["inputs"] == [{"input": "docs_shard_0_v2.jsonl.zip", "rows": 2}]

    (tmp_path / "imgs" / "000").mkdir(parents=True)
    shutil.copy(PHOTOS[0], tmp_path / "imgs" / "000" / "a.jpg")
    rows = [{"img_path": "./000/a.jpg", "prompt": "a prompt", "Task2": {"Caption": "a caption"}}]
    anno = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    with tarfile.open(tmp_path / "train_anno_realease_repath.jsonl.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("train_anno_realease_repath.jsonl")
        info.size = len(anno)
        tar.addfile(info, io.BytesIO(anno))
    recipe = _edited("image_text_journeydb", tmp_path, str(tmp_path / "train_anno_realease_repath.jsonl.tgz"),
                     tmp_path / "imgs")
    assert Recipe.load(recipe).input.format == "jsonl"
    prepare(recipe, tmp_path / "jdb", tokenizer_dir=TINY)
    assert [s.segments[1].text for s in _stored(tmp_path / "jdb")] == ["a caption"]


def test_llava_as_published_and_its_image_first_order(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    shutil.copy(PHOTOS[4], tmp_path / "coco" / "train2017" / "000000033471.jpg")
    row = {"id": "33471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "What is on the table?\n<image>"}, {"from": "gpt", "value": "A cup."}]}
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps([row]))
    orders = {}
    for first in (False, True):
        recipe = _edited("sft_llava", tmp_path, str(tmp_path / "llava_instruct_150k.json"),
                         tmp_path / "coco" / "train2017", image_first=first)
        prepare(recipe, tmp_path / f"out{first}", tokenizer_dir=TINY)
        turn = _stored(tmp_path / f"out{first}")[0].turns[0]
        orders[first] = [s.text if isinstance(s, Text) else type(s).__name__ for s in turn.content]
    assert orders == {False: ["What is on the table?\n", "Image"], True: ["Image", "What is on the table?"]}
    assert isinstance(_stored(tmp_path / "outTrue")[0].turns[0].content[0], Image)


def test_recipe_errors_say_what_to_do(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "x"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_type: image_text\ninput: rows.jsonl\ntokenizers: {image: ../tokenizers/seed.yaml}\n")
    with pytest.raises(FileNotFoundError, match=r"image tokenizer spec .*seed.yaml does not exist.*--tokenizers DIR"):
        prepare(recipe, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--tokenizers"):
        recipe_tokenizers(Recipe.load(recipe), tmp_path, local_rank=0)
    recipe.write_text("data_type: image_text\ninput: {paths: rows.jsonl, media_root: nowhere}\n")
    with pytest.raises(FileNotFoundError, match="media_root .*nowhere is not a folder"):
        prepare(recipe, tmp_path / "out")
