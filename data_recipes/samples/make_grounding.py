"""Make the demo's grounding sample (``data_recipes/samples/grounding/``; run once, outputs committed).

Boxes drawn by hand on six of the bundled 224 x 224 photos, each with a short referring expression,
written in Visual Genome's published layout (``region_descriptions.json``: per image its regions,
``x, y, width, height`` in pixels and ``phrase``), so the demo reads them with the Visual Genome
recipe's reader (``data_recipes/demo/grounding.yaml``). ``boxes.jpg`` shows the boxes on the photos.

    python data_recipes/samples/make_grounding.py      # from the repository root; needs Pillow
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
# photo -> [(x1, y1, x2, y2) in pixels of the 224 x 224 photo, referring expression]
REGIONS: dict[str, list[tuple[tuple[int, int, int, int], str]]] = {
    "cat": [((50, 75, 112, 112), "the left eye of the cat"), ((128, 160, 176, 198), "the pink nose of the cat")],
    "rocket": [((100, 62, 126, 216), "the white rocket in the middle"), ((32, 62, 62, 212), "the tower on the left")],
    "astronaut": [((8, 0, 166, 224), "the woman in the orange suit"), ((148, 146, 224, 224), "the black helmet")],
    "coffee": [((8, 8, 146, 152), "the cup of coffee"), ((92, 128, 152, 182), "the silver spoon")],
    "shuttle": [((78, 0, 136, 206), "the brown fuel tank")],
    "launchpad": [((148, 0, 206, 224), "the rocket on the right"), ((0, 0, 56, 224), "the dark tower")],
}


def main() -> None:
    out = HERE / "grounding"
    out.mkdir(exist_ok=True)
    rows = [{"id": photo, "regions": [{"region_id": f"{photo}-{k}", "image_id": photo, "x": x1, "y": y1,
                                       "width": x2 - x1, "height": y2 - y1, "phrase": phrase}
                                      for k, ((x1, y1, x2, y2), phrase) in enumerate(regions)]}
            for photo, regions in REGIONS.items()]
    (out / "region_descriptions.json").write_text(json.dumps(rows, indent=1) + "\n")
    sheet = Image.new("RGB", (224 * 3, 224 * 2))
    for n, (photo, regions) in enumerate(REGIONS.items()):
        im = Image.open(HERE / "images" / f"{photo}.jpg").convert("RGB")
        draw = ImageDraw.Draw(im)
        for (x1, y1, x2, y2), phrase in regions:
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=(255, 255, 0), width=2)
            draw.text((x1 + 3, y1 + 3), phrase, fill=(255, 255, 0))
        sheet.paste(im, ((n % 3) * 224, (n // 3) * 224))
    sheet.save(out / "boxes.jpg", quality=85)


if __name__ == "__main__":
    main()
