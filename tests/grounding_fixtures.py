"""Write a few rows of each grounding data set in its published layout (the fixtures the grounding
recipes are tested on), with the bundled photos standing in for the data sets' images.

    python tests/grounding_fixtures.py OUT_DIR     # writes OUT_DIR/{refcoco,grit,flickr30k_entities,visual_genome}

Layouts, as released:
- RefCOCO: the refer toolkit's refs list as JSON (``refs(unc).json``: the fields of ``refs(unc).p``)
  and COCO's ``instances.json`` (images with width/height/file_name, annotations with bbox
  [x, y, w, h] in pixels);
- GrIT: a parquet of Kosmos-2's GrIT-20M columns (key, url, caption, width, height, noun_chunks,
  ref_exps: [start, end, x1, y1, x2, y2, score] with normalized boxes, clip similarities);
- Flickr30k Entities: ``test.txt`` (image ids), ``Sentences/{id}.txt`` ([/EN#id/type phrase] markup),
  ``Annotations/{id}.xml`` (PASCAL VOC boxes, entity ids as object names);
- Visual Genome: ``region_descriptions.json`` (per image: regions with x, y, width, height, phrase).

Every photo is 224 x 224 px. Each layout holds one box that is wholly outside its image or has no
area, so the recipes' skip counts are checked too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data_recipes" / "samples" / "images"
SIDE = 224


def write_refcoco(out: Path) -> dict:
    """refs(unc).json + annotations/instances_train2014.json + train2014/ images. Returns what the
    recipe should give: per kept ref its sentences and normalized box."""
    (out / "train2014").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    boxes = {"cat": [40, 50, 100, 120], "rocket": [90, 10, 60, 200], "coffee": [300, 300, 10, 10],
             "astronaut": [20, 20, 0, 80]}  # coffee: outside the image; astronaut: no width
    splits = {"cat": "val", "rocket": "val", "coffee": "val", "astronaut": "val"}
    sentences = {"cat": ["the cat on the left", "a grey cat"], "rocket": ["the tall rocket"],
                 "coffee": ["the cup"], "astronaut": ["the man"]}
    for n, name in enumerate(sorted(boxes)):
        image_id, ann_id = 100 + n, 1000 + n
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        shutil.copy(PHOTOS / f"{name}.jpg", out / "train2014" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": SIDE, "height": SIDE})
        x, y, w, h = boxes[name]
        annotations.append({"id": ann_id, "image_id": image_id, "bbox": [x, y, w, h], "category_id": 1,
                            "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h]]})
        refs.append({"sent_ids": list(range(len(sentences[name]))), "file_name": f"{file_name[:-4]}_{ann_id}.jpg",
                     "ann_id": ann_id, "ref_id": n, "image_id": image_id, "split": splits[name],
                     "sentences": [{"tokens": s.split(), "raw": s.capitalize(), "sent_id": k, "sent": s}
                                   for k, s in enumerate(sentences[name])],
                     "category_id": 1})
    refs.append({**refs[0], "ref_id": 99, "split": "train"})  # another split: left out by fields.split
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / "instances_train2014.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    (out / "refs(unc).json").write_text(json.dumps(refs))
    return {s: (x / SIDE, y / SIDE, (x + w) / SIDE, (y + h) / SIDE)
            for name, (x, y, w, h) in boxes.items() if name in ("cat", "rocket") for s in sentences[name]}


def write_grit(out: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = [
        {"key": "000000000", "caption": "a cat sitting next to a red rocket",
         "noun_chunks": [[0, 5, 0.1, 0.2, 0.5, 0.9, 0.8], [22, 34, 0.55, 0.05, 0.95, 0.95, 0.7]],
         "ref_exps": [[0, 34, 0.1, 0.05, 0.95, 0.95, 0.6]]},
        {"key": "000000001", "caption": "two coins on a table",
         "noun_chunks": [[0, 9, 0.1, 0.1, 0.4, 0.4, 0.9], [0, 9, 0.5, 0.5, 0.9, 0.8, 0.9],
                         [13, 20, 0.0, 0.0, 1.0, 1.0, 0.5]], "ref_exps": []},
        {"key": "000000002", "caption": "a cup", "noun_chunks": [[0, 5, 1.2, 1.3, 1.5, 1.6, 0.9]],
         "ref_exps": []},  # a box outside the image
    ]
    for row, photo in zip(rows, ("cat", "coins", "coffee")):
        shutil.copy(PHOTOS / f"{photo}.jpg", out / "images" / f"{row['key']}.jpg")
        row.update({"url": f"https://example.com/{row['key']}.jpg", "width": SIDE, "height": SIDE,
                    "clip_similarity_vitb32": 0.3, "clip_similarity_vitl14": 0.3})
    pq.write_table(pa.Table.from_pylist(rows), out / "grit-20m-00000.parquet")
    return rows


def write_flickr30k_entities(out: Path) -> None:
    (out / "Sentences").mkdir(parents=True, exist_ok=True)
    (out / "Annotations").mkdir(exist_ok=True)
    (out / "flickr30k-images").mkdir(exist_ok=True)
    shutil.copy(PHOTOS / "astronaut.jpg", out / "flickr30k-images" / "1000092795.jpg")
    shutil.copy(PHOTOS / "coins.jpg", out / "flickr30k-images" / "10002456.jpg")
    (out / "test.txt").write_text("1000092795\n10002456\n")
    (out / "Sentences" / "1000092795.txt").write_text(
        "[/EN#1/people An astronaut] in [/EN#2/clothing an orange suit] stands in [/EN#3/scene the sun] .\n"
        "[/EN#1/people A man] smiles .\n")
    (out / "Annotations" / "1000092795.xml").write_text(_voc(
        "1000092795.jpg", [("1", (30, 20, 190, 223)), ("2", (40, 80, 180, 223))], scene=("3",)))
    (out / "Sentences" / "10002456.txt").write_text("[/EN#7/other Two coins] lie on [/EN#8/other a table] .\n")
    (out / "Annotations" / "10002456.xml").write_text(_voc(
        "10002456.jpg", [("7", (10, 10, 100, 100)), ("7", (120, 120, 200, 200)), ("8", (250, 10, 300, 40))]))


def _voc(filename: str, boxes: list[tuple[str, tuple[int, int, int, int]]], scene: tuple[str, ...] = ()) -> str:
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>" for name, b in boxes)
    objects += "".join(f"<object><name>{s}</name><nobndbox>1</nobndbox><scene>1</scene></object>" for s in scene)
    return (f"<annotation><folder>flickr30k_images</folder><filename>{filename}</filename><size><width>{SIDE}"
            f"</width><height>{SIDE}</height><depth>3</depth></size>{objects}</annotation>")


def write_visual_genome(out: Path) -> None:
    (out / "VG_100K").mkdir(parents=True, exist_ok=True)
    shutil.copy(PHOTOS / "shuttle.jpg", out / "VG_100K" / "1.jpg")
    shutil.copy(PHOTOS / "launchpad.jpg", out / "VG_100K" / "2.jpg")
    regions = [
        {"id": 1, "regions": [
            {"region_id": 11, "width": 100, "height": 60, "image_id": 1, "phrase": "the white shuttle", "y": 80, "x": 60},
            {"region_id": 12, "width": 224, "height": 30, "image_id": 1, "phrase": "a plain background", "y": 0,
             "x": 0}]},
        {"id": 2, "regions": [
            {"region_id": 21, "width": 0, "height": 40, "image_id": 2, "phrase": "a line", "y": 10, "x": 10}]},
    ]  # image 2's only region has no width
    (out / "region_descriptions.json").write_text(json.dumps(regions))


def write_all(out: Path) -> None:
    write_refcoco(out / "refcoco")
    write_grit(out / "grit")
    write_flickr30k_entities(out / "flickr30k_entities")
    write_visual_genome(out / "visual_genome")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/grounding_fixtures.py OUT_DIR")
    write_all(Path(sys.argv[1]))
