"""A generation written out: ``transcript.md``, ``transcript.html`` (images shown, speech
playable, video frames animated, boxes drawn on the image they point at) and ``generation.json`` (ids, codes and settings).

Prompt media files are copied beside the transcript, so the folder stands on its own.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mio.generate.media import MediaFile
from mio.generate.results import BOX, Decoded, Generation
from mio.segments import Box, Image, Segment, Speech, Text, Video
from mio.vocab import IMAGE


@dataclasses.dataclass
class Shown:
    """One item of the page: text, a media file, or a note."""

    kind: str  # text, image, speech, video, box, note
    text: str = ""
    file: str | None = None
    boxes: list[tuple[tuple[float, ...], str]] = dataclasses.field(default_factory=list)  # image: boxes drawn on it
    coords: tuple[float, ...] = ()  # box: normalized x1 y1 x2 y2


def shown_turns(generation: Generation, out: Path) -> list[tuple[str, list[Shown]]]:
    """The prompt's turns for display; media files are copied into ``out/prompt/``."""
    turns = []
    copied = 0
    for turn in generation.turns:
        shown = []
        for x in turn.content:
            if isinstance(x, Text):
                shown.append(Shown("text", x.text))
            elif isinstance(x, Box):
                shown.append(Shown(BOX, x.phrase or "", coords=x.coords))
            elif isinstance(x, MediaFile):
                copied += 1
                name = f"prompt/{copied}_{x.path.name}"
                (out / "prompt").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(x.path, out / name)
                shown.append(Shown(x.kind, x.path.name, name))
            else:
                shown.append(Shown("note", _describe_codes(x)))
        turns.append((turn.role, shown))
    return turns


def _describe_codes(seg: Segment) -> str:
    if isinstance(seg, Image):
        return "[an image given as 32 codes]"
    if isinstance(seg, Video):
        return f"[a video given as {len(seg.frames)} frames of codes]"
    if isinstance(seg, Speech):
        codes = np.asarray(seg.codes)
        return f"[speech given as codes: {codes.shape[0]} layer(s) x {codes.shape[1]} frames]"
    return ""


def answer_items(decoded: list[Decoded]) -> list[Shown]:
    out = []
    for d in decoded:
        if d.kind == "text":
            out.append(Shown("text", d.text))
        elif d.kind == BOX:
            out.append(Shown(BOX, d.text, coords=tuple(d.codes)))
        elif d.kind == "partial" or d.file is None:
            out.append(Shown("note", f"{d.kind}: {d.note}"))
        else:
            out.append(Shown(d.kind, d.note, d.file))
    return out


def attach_boxes(items: list[Shown]) -> None:
    """Each box is drawn on the last image before it in reading order over the prompt and answer
    ("where is the cat in {image}?" -> a box), or, with none before it, on the first image after
    it ("what is in {box} of {image}?")."""
    image: Shown | None = None
    waiting: list[Shown] = []
    for item in items:
        if item.kind == IMAGE and item.file is not None:
            image = item
            image.boxes += [(b.coords, b.text) for b in waiting]
            waiting = []
        elif item.kind == BOX:
            if image is None:
                waiting.append(item)
            else:
                image.boxes.append((item.coords, item.text))


def _box_label(item: Shown) -> str:
    coords = " ".join(f"{v:.3f}" for v in item.coords)
    return f"[{item.text + ': ' if item.text else ''}box {coords}]"


def _md(item: Shown) -> str:
    if item.kind == "text":
        return item.text
    if item.kind == BOX:
        return _box_label(item)
    if item.kind == "note":
        return f"\n> {item.text}\n"
    label = f"{item.kind}: {item.text}" if item.text else item.kind
    if item.kind == "speech":
        return f"\n[{label}]({item.file})\n"
    return f"\n![{label}]({item.file})\n"


def _html(item: Shown) -> str:
    if item.kind == "text":
        return f'<span class="text">{html.escape(item.text)}</span>'
    if item.kind == BOX:
        return f'<span class="boxref">{html.escape(_box_label(item))}</span>'
    if item.kind == "note":
        return f'<div class="note">{html.escape(item.text)}</div>'
    src = html.escape(item.file or "")
    caption = f"<figcaption>{html.escape(item.kind)}{': ' + html.escape(item.text) if item.text else ''}</figcaption>"
    if item.kind == "speech":
        return f'<figure><audio controls src="{src}"></audio>{caption}</figure>'
    if item.kind == "video" and not src.endswith(".gif"):
        return f'<figure><video controls loop autoplay muted src="{src}"></video>{caption}</figure>'
    boxes = "".join(  # percentages of the shown image: the boxes are normalized to it
        f'<div class="box" style="left:{x1 * 100:.2f}%;top:{y1 * 100:.2f}%;width:{(x2 - x1) * 100:.2f}%;'
        f'height:{(y2 - y1) * 100:.2f}%" title="{html.escape(label)}"></div>' for (x1, y1, x2, y2), label in item.boxes)
    return f'<figure><div class="frame"><img src="{src}" alt="{html.escape(item.kind)}">{boxes}</div>{caption}</figure>'


def write_transcript(out: Path, generation: Generation, decoded: list[Decoded], info: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    turns = shown_turns(generation, out)
    answer = answer_items(decoded)
    attach_boxes([i for _, items in turns for i in items] + answer)
    r = generation.result
    summary = {
        "model": info.get("model"),
        "new_tokens": len(r.ids),
        "stopped": "stop token" if r.stopped == "stop" else "token limit",
        "seconds": round(r.seconds, 3),
        "tokens_per_second": round(r.tokens_per_second, 1),
        "seed": generation.seed,
        "preset": generation.preset,
        "chat_template": generation.chat,
        "image_decoder": info.get("unclip"),
    }
    settings = {m: dataclasses.asdict(s) for m, s in generation.settings.items()}

    md = ["# mio generate", ""]
    for role, items in turns:
        md += [f"## {role}", "", "".join(_md(i) for i in items).strip(), ""]
    md += ["## answer", "", "".join(_md(i) for i in answer).strip() or "*(empty)*", ""]
    md += ["## run", "", *[f"- {k}: {v}" for k, v in summary.items()], *[f"- note: {n}" for n in r.notes], "",
           f"decoding settings per modality (preset {generation.preset}, with overrides):", "", "```json",
           json.dumps(settings, indent=1), "```", ""]
    (out / "transcript.md").write_text("\n".join(md))

    body = "".join(f"<section><h2>{html.escape(role)}</h2>{''.join(_html(i) for i in items)}</section>"
                   for role, items in turns)
    body += f"<section class='answer'><h2>answer</h2>{''.join(_html(i) for i in answer) or '<em>(empty)</em>'}</section>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    (out / "transcript.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>mio generate</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
section{{margin:1em 0;padding:.5em 1em;border:1px solid #ddd}}
.text{{white-space:pre-wrap}} figure{{display:inline-block;margin:.5em}} img{{width:192px;image-rendering:pixelated}}
.note{{color:#a33;font-style:italic;margin:.5em 0}} .frame{{position:relative;display:inline-block;line-height:0}}
.box{{position:absolute;border:2px solid #ff0;box-shadow:0 0 0 1px #000}} .boxref{{color:#775;font-family:monospace}}
td{{padding:2px 8px;border-bottom:1px solid #eee}}</style></head>
<body><h1>mio generate</h1>{body}<h2>run</h2><table>{rows}</table>
<pre>{html.escape(json.dumps(settings, indent=1))}</pre></body></html>
""")

    record = {"summary": summary, "settings": settings,
              "unclip_settings": dataclasses.asdict(info["unclip_settings"]) if info.get("unclip_settings") else None,
              "prompt_ids": generation.prompt_ids.tolist(), "new_ids": r.ids, "modes": r.modes, "notes": r.notes,
              "partial": dataclasses.asdict(generation.partial) if generation.partial else None,
              "answer": [dataclasses.asdict(d) for d in decoded]}
    (out / "generation.json").write_text(json.dumps(record) + "\n")
    return out / "transcript.md"
