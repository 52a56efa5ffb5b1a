"""Grounding data: each recipe on fixtures written in its data set's published layout, and the
boxes following the image through every transform of prepare (EXIF orientation, the tokenizer's
resize, clipping), one test per transform."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from grounding_fixtures import SIDE, write_flickr30k_entities, write_grit, write_refcoco, write_visual_genome
from PIL import Image as PILImage

from mio.data.inputs import SkipSample
from mio.data.layouts.grounding import normalized_box, upright_box
from mio.data.prepare import prepare
from mio.data.shards import iter_shard, list_shards
from mio.media import read_image
from mio.segments import Box, Image

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "data_recipes"
TINY = ROOT / "tokenizers" / "tiny"


def _run(name: str, tmp: Path, paths: str, media_root: Path, **fields) -> tuple[dict, list]:
    """The shipped recipe with its paths (and layout options in `fields`) edited, prepared."""
    raw = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    raw["input"]["paths"], raw["input"]["media_root"] = paths, str(media_root)
    raw["fields"] = {**(raw.get("fields") or {}), **fields}
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    m = prepare(recipe, tmp / "out", tokenizer_dir=TINY)
    assert m["samples"] + sum(m["skipped"].values()) == m["seen"]
    return m, [s for shard in list_shards(tmp / "out") for s in iter_shard(shard)]


def _close(a, b) -> bool:
    return np.allclose(a, b, atol=1e-9)


def test_refcoco_refs_json_with_coco_instances(tmp_path):
    want = write_refcoco(tmp_path / "refcoco")
    root = tmp_path / "refcoco"
    m, stored = _run("grounding_refcoco", tmp_path, str(root / "refs(unc).json"), root / "train2014",
                     instances=str(root / "annotations" / "instances_train2014.json"))
    assert m["skipped"] == {"other_split": 1, "box_outside_image": 1, "box_degenerate": 1}
    got = {}
    for s in stored:
        assert isinstance(s.segments[0], Image) and s.data_type == "grounding"
        got.update({b.phrase: b.coords for b in s.segments[1:]})
    assert got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)


def test_grit_parquet_noun_chunks(tmp_path):
    write_grit(tmp_path / "grit")
    m, stored = _run("grounding_grit", tmp_path, str(tmp_path / "grit" / "*.parquet"), tmp_path / "grit" / "images")
    assert m["skipped"] == {"box_outside_image": 1}
    cat, coins = (s.segments[1:] for s in stored)
    assert [type(x).__name__ for x in cat] == ["Box", "Text", "Box"]
    assert (cat[0].phrase, cat[1].text, cat[2].phrase) == ("a cat", " sitting next to ", "a red rocket")
    assert _close(cat[0].coords, (0.1, 0.2, 0.5, 0.9))
    # One phrase, two boxes: the second box follows without a phrase.
    assert [(x.phrase if isinstance(x, Box) else x.text) for x in coins] == ["two coins", None, " on ", "a table"]


def test_flickr30k_entities_sentences_and_annotations(tmp_path):
    root = tmp_path / "f30k"
    write_flickr30k_entities(root)
    m, stored = _run("grounding_flickr30k_entities", tmp_path, str(root / "test.txt"), root / "flickr30k-images")
    assert m["samples"] == 2 and m["skipped"] == {"box_outside_image": 1}  # 10002456: a table past the image
    first = stored[0].segments[1:]
    assert [(x.phrase if isinstance(x, Box) else x.text) for x in first] == \
        ["An astronaut", " in ", "an orange suit", " stands in the sun ."]  # the scene has no box: text
    assert _close(first[0].coords, (30 / SIDE, 20 / SIDE, 190 / SIDE, 223 / SIDE))


def test_visual_genome_region_descriptions(tmp_path):
    root = tmp_path / "vg"
    write_visual_genome(root)
    m, stored = _run("grounding_visual_genome", tmp_path, str(root / "region_descriptions.json"), root / "VG_100K")
    assert m["skipped"] == {"box_degenerate": 1}
    (sample,) = stored
    assert [b.phrase for b in sample.segments[1:]] == ["the white shuttle", "a plain background"]
    assert _close(sample.segments[1].coords, (60 / SIDE, 80 / SIDE, 160 / SIDE, 140 / SIDE))


# --- transforms ------------------------------------------------------------------------------
def _white_box(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """The normalized bounding box of the bright pixels of an (H, W, 3) image."""
    ys, xs = np.nonzero(pixels.mean(-1) > 128)
    h, w = pixels.shape[:2]
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def _photo_with_box(size: tuple[int, int], box_px: tuple[int, int, int, int]) -> PILImage.Image:
    im = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = box_px
    im[y1:y2, x1:x2] = 255
    return PILImage.fromarray(im)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_moves_the_boxes_with_the_pixels(tmp_path, orientation):
    """prepare reads the image upright (mio.media.read_image); the stored box is where the white
    rectangle, annotated in the stored frame, is in the upright image."""
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    photo = _photo_with_box((240, 160), (30, 20, 90, 120))  # wide, so a rotation changes the frame
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    photo.save(root / "VG_100K" / "1.png", exif=exif)
    (root / "VG_100K" / "1.jpg").write_bytes((root / "VG_100K" / "1.png").read_bytes())  # PNG bytes, exact pixels
    regions = [{"id": 1, "regions": [{"region_id": 1, "x": 30, "y": 20, "width": 60, "height": 100, "image_id": 1,
                                      "phrase": "the white box"}]}]
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    _, (sample,) = _run("grounding_visual_genome", tmp_path, str(root / "region_descriptions.json"), root / "VG_100K")
    upright = np.asarray(read_image(root / "VG_100K" / "1.jpg", "1.jpg"))
    assert _close(sample.segments[1].coords, _white_box(upright))
    assert _close(sample.segments[1].coords, upright_box((30 / 240, 20 / 160, 90 / 240, 120 / 160), orientation))


def test_the_tokenizers_resize_leaves_normalized_boxes_in_place():
    """SEED resizes the whole image to S x S without cropping: the rectangle lands at the same
    normalized box (to a pixel of the resized image)."""
    from mio.tokenizers.build import build_tokenizer

    tok = build_tokenizer(TINY / "seed.yaml")
    box_px = (60, 30, 240, 90)
    photo = _photo_with_box((300, 150), box_px)
    pixels = tok.preprocess(photo)  # (3, S, S), normalized with the CLIP mean and std
    restored = (pixels * tok._std + tok._mean).permute(1, 2, 0).numpy() * 255
    want = (60 / 300, 30 / 150, 240 / 300, 90 / 150)
    assert np.allclose(_white_box(restored), want, atol=1.5 / tok.image_size)


def test_clipping_and_the_skip_reasons():
    assert normalized_box((-10, 20, 50, 300), 100, 200, "r") == (0.0, 0.1, 0.5, 1.0)  # clipped to the image
    reasons = Counter()
    for box in [(120, 0, 150, 10), (0, 0, 0, 10), (10, 10, 10, 10), (-5, -5, 0, 0), (5, 5, 4, 20)]:
        with pytest.raises(SkipSample) as e:
            normalized_box(box, 100, 100, "r")
        reasons[e.value.reason] += 1
    assert reasons == {"box_outside_image": 2, "box_degenerate": 3}
