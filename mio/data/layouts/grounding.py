"""Grounding data: RefCOCO/+/g, Kosmos-2's GrIT, Flickr30k Entities and Visual Genome regions
read in their published layouts, into ``grounding`` samples (an image, then boxes with phrases).

A grounding sample is its image and either *regions* (boxes each with its referring expression
or region description, no other text) or a *grounded caption* (texts and phrase-linked boxes;
see :mod:`mio.templates`). Boxes are stored normalized to the image as the model sees it: the
file decoded upright. So every transform of the pixels in prepare moves the boxes with them:

- **EXIF orientation** (``mio.media.read_image`` rotates/mirrors the file upright): annotations
  are in the stored frame, so each box goes through the same transpose (:func:`upright_box`);
- **the tokenizer's resize** to S x S (SEED resizes without cropping): normalized coordinates
  are unchanged by a resize of the whole image, so nothing to do (tested);
- **clipping**: a box reaching past the image is clipped to it; a box wholly outside the image
  (``box_outside_image``) or with no area (``box_degenerate``) skips its sample with that reason.

Layouts (``recipe.layout``), each with the input format its release has:

- ``refcoco`` (input ``json``): the refer toolkit's ``refs(unc|unc+|umd|google).p`` converted to
  JSON (the same list of refs: ``ref_id, ann_id, image_id, split, sentences[{sent, raw}]``; the
  pickles themselves are never unpickled). Boxes come from COCO's ``instances.json``
  (``fields.instances``: its path; ``annotations[].bbox`` = [x, y, w, h] px, ``images[]`` width,
  height and file_name). ``fields.split`` keeps one split (e.g. ``val``, ``testA``).
- ``grit`` (input ``parquet``): Kosmos-2's GrIT-20M rows, ``caption``, ``noun_chunks`` (or
  ``ref_exps`` with ``fields.spans: ref_exps``): ``[start, end, x1, y1, x2, y2, score]``, character
  spans of the caption and boxes normalized to the image; the image file is ``fields.image``
  (default ``{key}.jpg``, img2dataset's name) under ``input.media_root``.
- ``flickr30k_entities`` (input format ``flickr30k_entities``): the release's split list
  (``train.txt``/``val.txt``/``test.txt``, one image id a line) beside ``Sentences/{id}.txt``
  (``[/EN#id/type phrase]`` markup, one sentence a line) and ``Annotations/{id}.xml`` (PASCAL VOC:
  ``<object><name>entity id</name><bndbox>`` px); one sample per sentence; phrases without a box
  (``nobndbox``) stay text. Images: ``{id}.jpg`` under ``input.media_root``.
- ``visual_genome`` (input ``json``): ``region_descriptions.json``, one row per image with its
  ``regions`` (``x, y, width, height`` px, ``phrase``); images ``{image_id}.jpg`` under
  ``input.media_root``.
"""

from __future__ import annotations

import functools
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image as PILImage

from mio.data.fields import MediaRef, as_media, as_text, lookup
from mio.data.formats import FORMAT_READERS, InputRow
from mio.data.inputs import Part, SkipSample
from mio.data.layouts.registry import RowDraft, RowFields, register_layout
from mio.segments import Box, Text

Coords = tuple[float, float, float, float]


# --- box transforms ---------------------------------------------------------------------------
def normalized_box(xyxy: Sequence[float], width: float, height: float, where: str) -> Coords:
    """A box in pixels (x1, y1, x2, y2) of a width x height image -> normalized, clipped to the
    image. Wholly outside: ``box_outside_image``; no area left: ``box_degenerate`` (SkipSample)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if width <= 0 or height <= 0:
        raise SkipSample("bad_field", f"{where}: image size {width}x{height} is not positive")
    if x2 <= x1 or y2 <= y1:
        raise SkipSample("box_degenerate", f"{where}: box {list(xyxy)} has no area")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise SkipSample("box_outside_image", f"{where}: box {list(xyxy)} lies outside the {width}x{height} image")
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    return x1 / width, y1 / height, x2 / width, y2 / height


def checked_box(coords: Sequence[float], where: str) -> Coords:
    """A box already normalized (GrIT) -> clipped to [0, 1], with the same skip reasons."""
    return normalized_box(coords, 1.0, 1.0, where)


# How a point (x, y) of the stored image, normalized, moves under each EXIF orientation's
# transpose (the one PIL's ImageOps.exif_transpose applies: 6 is ROTATE_270, 8 ROTATE_90, ...).
_ORIENTATION = {
    1: lambda x, y: (x, y),
    2: lambda x, y: (1 - x, y),  # FLIP_LEFT_RIGHT
    3: lambda x, y: (1 - x, 1 - y),  # ROTATE_180
    4: lambda x, y: (x, 1 - y),  # FLIP_TOP_BOTTOM
    5: lambda x, y: (y, x),  # TRANSPOSE
    6: lambda x, y: (1 - y, x),  # ROTATE_270 (clockwise)
    7: lambda x, y: (1 - y, 1 - x),  # TRANSVERSE
    8: lambda x, y: (y, 1 - x),  # ROTATE_90 (counter-clockwise)
}


def upright_box(box: Coords, orientation: int) -> Coords:
    """A normalized box of the stored image -> the same region of the image turned upright."""
    move = _ORIENTATION.get(orientation, _ORIENTATION[1])
    (ax, ay), (bx, by) = move(box[0], box[1]), move(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def stored_frame(ref: MediaRef) -> tuple[tuple[int, int], int] | None:
    """((width, height) as stored, EXIF orientation) from the file's header; None when it cannot be
    read (loading the image then skips the sample with its reason)."""
    try:
        with PILImage.open(ref.path if ref.path is not None else io.BytesIO(ref.data or b"")) as im:
            return im.size, int(im.getexif().get(0x0112, 1) or 1)
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError):
        return None


# --- drafts -----------------------------------------------------------------------------------
GroundingReader = Callable[[RowFields], tuple[MediaRef, list[Any]]]


def upright_draft(read: GroundingReader, row: RowFields) -> RowDraft:
    """One row of a grounding layout, read by its layout's ``read`` -> its draft: the image, then
    boxes (and texts), the boxes normalized to the upright image."""
    image, items = read(row)
    frame = stored_frame(image)
    orientation = frame[1] if frame is not None else 1
    upright = [Box(upright_box(x.coords, orientation), x.phrase) if isinstance(x, Box) else x for x in items]
    if not any(isinstance(x, Box) for x in upright):
        raise SkipSample("no_box", f"{row.where}: no box to ground")
    return RowDraft(row.where, [image, *upright])


def _pixel_size(image: MediaRef, declared: tuple[Any, Any] | None, where: str) -> tuple[float, float]:
    """The frame pixel boxes are in: the size the annotation declares, else the stored file's."""
    if declared is not None and all(v is not None for v in declared):
        return float(declared[0]), float(declared[1])
    frame = stored_frame(image)
    if frame is None:
        raise SkipSample("unreadable_image", f"{where}: image {image.name} cannot be read for its size")
    return float(frame[0][0]), float(frame[0][1])


@functools.lru_cache(maxsize=4)
def coco_instances(path: str) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """COCO's instances.json -> (annotation id -> annotation, image id -> image), read once."""
    try:
        data = json.loads(Path(path).read_text())
        return {int(a["id"]): a for a in data["annotations"]}, {int(i["id"]): i for i in data["images"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances.json (annotations and images): {e}") from None


def _refcoco(row: RowFields) -> tuple[MediaRef, list[Any]]:
    recipe, values = row.recipe, row.values
    f, where = recipe.fields, row.where
    if "instances" not in f:
        raise ValueError(f"recipe {recipe.path}: layout refcoco needs fields.instances, the path of COCO's "
                         "instances.json (the boxes)")
    split = f.get("split")
    if split is not None and values.get("split") != split:
        raise SkipSample("other_split", f"{where}: split {values.get('split')!r}, not {split!r}")
    annotations, images = coco_instances(str(recipe.resolve(f["instances"])))
    ann = annotations.get(int(lookup(values, "ann_id", where)))
    if ann is None:
        raise SkipSample("missing_field", f"{where}: annotation {values.get('ann_id')} is not in {f['instances']}")
    info = images.get(int(ann["image_id"]))
    if info is None:
        raise SkipSample("missing_field", f"{where}: image {ann['image_id']} is not in {f['instances']}")
    image = as_media(info["file_name"], "image", row.base, where, "file_name")
    x, y, w, h = (float(v) for v in ann["bbox"])
    coords = normalized_box((x, y, x + w, y + h), float(info["width"]), float(info["height"]), where)
    sentences = [as_text(s.get("sent", s.get("raw")), where, "sentence") for s in lookup(values, "sentences", where)]
    return image, [Box(coords, s.strip()) for s in sentences if s.strip()]


def _grit(row: RowFields) -> tuple[MediaRef, list[Any]]:
    recipe, values = row.recipe, row.values
    f, where = recipe.fields, row.where
    image = as_media(lookup(values, f.get("image", "{key}.jpg"), where), "image", row.base, where, "image")
    caption = as_text(lookup(values, f.get("caption", "caption"), where), where, "caption")
    spans = lookup(values, f.get("spans", "noun_chunks"), where)
    return image, caption_items(caption, [(int(s[0]), int(s[1]), checked_box(s[2:6], where)) for s in spans], where)


def caption_items(caption: str, spans: Sequence[tuple[int, int, Coords]], where: str) -> list[Any]:
    """A caption and its (start, end, box) character spans -> texts and phrase-linked boxes. Spans
    of one phrase (equal start and end) give one phrase with several boxes; a span overlapping an
    earlier one is dropped (a grounded caption links each character at most once)."""
    items: list[Any] = []
    pos = 0
    last: tuple[int, int] | None = None
    for start, end, coords in sorted(spans, key=lambda s: (s[0], s[1])):
        if (start, end) == last:
            items.append(Box(coords))  # another box of the same phrase
            continue
        if start < pos or not 0 <= start < end <= len(caption):
            continue
        if start > pos:
            items.append(Text(caption[pos:start]))
        items.append(Box(coords, caption[start:end]))
        pos, last = end, (start, end)
    if pos < len(caption):
        items.append(Text(caption[pos:]))
    return items


def _visual_genome(row: RowFields) -> tuple[MediaRef, list[Any]]:
    values = row.values
    where = row.where
    regions = lookup(values, "regions", where)
    image_id = values.get("id", values.get("image_id"))
    if image_id is None and regions:
        image_id = regions[0].get("image_id")
    image = as_media(f"{image_id}.jpg", "image", row.base, where, "image")
    size = _pixel_size(image, None, where)
    items = []
    for r in regions:
        x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
        items.append(Box(normalized_box((x, y, x + w, y + h), *size, f"{where} region {r.get('region_id')}"),
                         as_text(r["phrase"], where, "phrase").strip()))
    return image, items


# Flickr30k Entities' sentence markup: [/EN#18/people A man]
_ENTITY = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]*)\]")


def _flickr30k(row: RowFields) -> tuple[MediaRef, list[Any]]:
    values = row.values
    where = row.where
    image = as_media(f"{values['image_id']}.jpg", "image", row.base, where, "image")
    boxes, size = flickr30k_boxes(values["annotation"], where)
    items: list[Any] = []
    pos = 0
    sentence = values["sentence"]
    for m in _ENTITY.finditer(sentence):
        if m.start() > pos:
            items.append(Text(sentence[pos:m.start()]))
        phrase, entity = m.group(3), m.group(1)
        found = [normalized_box(b, *size, f"{where} entity {entity}") for b in boxes.get(entity, [])]
        if found:
            items += [Box(found[0], phrase), *(Box(b) for b in found[1:])]
        else:  # not visual, or a scene without a box: the phrase stays text
            items.append(Text(phrase))
        pos = m.end()
    if pos < len(sentence):
        items.append(Text(sentence[pos:]))
    merged: list[Any] = []
    for x in items:  # adjacent texts as one
        if merged and isinstance(x, Text) and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + x.text)
        else:
            merged.append(x)
    return image, merged


def flickr30k_boxes(path: Path, where: str) -> tuple[dict[str, list[Coords]], tuple[float, float]]:
    """An Annotations/{id}.xml -> (entity id -> its boxes in pixels, (width, height))."""
    try:
        root = ET.parse(path).getroot()
        size = (float(root.findtext("size/width")), float(root.findtext("size/height")))  # type: ignore[arg-type]
    except (OSError, ET.ParseError, TypeError, ValueError) as e:
        raise SkipSample("bad_annotation", f"{where}: {path} is not a Flickr30k Entities annotation: {e}") from None
    boxes: dict[str, list[Coords]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        xyxy = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[arg-type]
        for name in obj.iter("name"):
            boxes.setdefault((name.text or "").strip(), []).append(xyxy)  # type: ignore[arg-type]
    return boxes, size


def flickr30k_rows(part: Part) -> Iterator[InputRow]:
    """A Flickr30k Entities split list (one image id a line) -> one row per sentence of each image:
    ``Sentences/{id}.txt`` and ``Annotations/{id}.xml`` beside the list."""
    listing = Path(part.locator)
    root = listing.parent
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    for n, image_id in enumerate(ids):
        sentences_file = root / "Sentences" / f"{image_id}.txt"
        annotation = root / "Annotations" / f"{image_id}.xml"
        where = f"{part.name}:{image_id}"
        if not sentences_file.is_file():
            detail = f"{where}: {sentences_file} is missing"
            yield InputRow(where, lambda detail=detail: _skip("missing_file", detail), part.media_base, read=(n + 1) / len(ids))
            continue
        lines = [line for line in sentences_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        for k, sentence in enumerate(lines):
            values = {"image_id": image_id, "sentence": sentence, "annotation": annotation}
            yield InputRow(f"{where}#{k}", lambda values=values: values, part.media_base, read=(n + 1) / len(ids))


def _skip(reason: str, detail: str) -> dict[str, Any]:
    raise SkipSample(reason, detail)


# Each layout's field names are its release's own (above), so none are registered as defaults.
for _layout, _read in (("refcoco", _refcoco), ("grit", _grit), ("flickr30k_entities", _flickr30k),
                       ("visual_genome", _visual_genome)):
    register_layout(_layout, "grounding", {})(functools.partial(upright_draft, _read))
FORMAT_READERS["flickr30k_entities"] = flickr30k_rows  # a split list, with Sentences/ and Annotations/ beside it
