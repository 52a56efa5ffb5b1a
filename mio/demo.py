"""`mio demo`: the whole path on the embedded tiny default, with proof that it learns.

bundled raw samples -> shards (tiny tokenizers) -> tiny base Llama -> the four tiny stages
(masked packing) -> greedy generation in both directions -> report.html + summary.json.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from mio.assets import DATA_RECIPES, TOKENIZER_SPECS
from mio.assets import STAGES as ALL_STAGES
from mio.data.prepare import prepare
from mio.data.shards import iter_shard, list_shards
from mio.eval.report import metrics_table
from mio.eval.run import EvalAnswer, EvalSettings, evaluate, show
from mio.eval.tasks import answer_text
from mio.generate.generator import Generator
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone
from mio.report import StageLog, final_loss, find_stages, packing_efficiency
from mio.report import write_report as write_training_report
from mio.segments import Box, Image, Speech, Text
from mio.templates import GROUNDING_PRETRAIN, GROUNDING_TASKS, PRETRAIN_TEMPLATES, SYSTEM_SPEECH, SYSTEM_STANDARD

RECIPES = DATA_RECIPES / "demo"
SAMPLES = DATA_RECIPES / "samples"
STAGES = ALL_STAGES / "tiny"
# The demo's path: the paper's three pretraining stages, then full SFT (the LoRA variant of SFT,
# stages/tiny/4_sft_lora.yaml, reads the per-family SFT recipes and is not part of it).
DEMO_STAGES = ("1_alignment", "2_interleaved", "3_speech", "4_sft")
TINY_TOKENIZERS = TOKENIZER_SPECS / "tiny"

# The three figures the demo must reach (issue: at least 90% each).
EVAL_TASKS = {"image_generation": "caption_to_image_exact", "image_captioning": "image_to_caption_exact",
              "asr": "asr_exact"}
# `mio eval` at the end: greedy answers to the SFT prompts of these tasks (image_qa scored by VQA accuracy too).
EVAL = EvalSettings(tasks=(*EVAL_TASKS, "image_qa"), max_new_tokens=96, batch_size=8,
                    decode={"all": {"num_beams": 1, "do_sample": False}})
# Image generation again with classifier-free guidance 3 inside image blocks (`mio eval --set
# image.guidance=3`), reported beside guidance 1 (the run above). The tiny stages train without
# condition dropout, so the unconditional branch is one the model never learnt: the figure shows
# guidance at work end to end, not what it gains on a model trained for it.
EVAL_GUIDED = dataclasses.replace(EVAL, tasks=("image_generation",),
                                  decode={**EVAL.decode, "image": {"guidance": 3.0}, "video": {"guidance": 3.0}})
# Stages 1-3 validate on the shard of image-text, speech-text and text pairs they hold out
# (data.val_fraction of the tiny stages). The demo's evaluation needs every SFT conversation
# trained, so SFT validates on the pairs as conversations, which it does not train on.
STAGE_OVERRIDES = {"4_sft": ["--data.val_fraction=0", "--data.val_datasets=[{path: image_text, format: sft, tasks: "
                                                      "[image_captioning]}, {path: speech_text, format: sft, tasks: [asr]}]"]}
# Grounding (DESIGN.md, Grounding): stage I adds location tokens (32 bins per axis) and pretrains on the
# hand-drawn boxes of data_recipes/samples/grounding/ (both directions), SFT trains them as refexp and
# refexp_generation conversations, and `mio eval` scores refexp on them (accuracy at IoU >= 0.5; the
# demo memorises them). The stage files stay as they are: these join their own datasets.
GROUNDING_DATA = {"1_alignment": {"path": "grounding", "weight": 2},
                  "4_sft": {"path": "grounding", "weight": 0.5, "format": "sft", "tasks": ["refexp", "refexp_generation"]}}
GROUNDING_EVAL = EvalSettings(tasks=("refexp",), max_new_tokens=16, batch_size=8,
                              decode={"all": {"num_beams": 1, "do_sample": False}})


def check_bundle() -> None:
    """Fail early, naming the item, if the demo's inputs are incomplete."""
    for folder in (RECIPES, SAMPLES, STAGES, TINY_TOKENIZERS):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: the demo's bundled inputs are missing (is this a full checkout?)")
    for jsonl in sorted(SAMPLES.glob("*.jsonl")):
        for lineno, line in enumerate(jsonl.read_text().splitlines(), 1):
            row = json.loads(line)
            refs = [row] + row.get("segments", []) + [c for m in row.get("messages", []) for c in m.get("content", [])]
            for ref in refs:
                for key in ("image", "audio", "speech", "video"):
                    if key in ref and not (SAMPLES / ref[key]).is_file():
                        raise FileNotFoundError(f"{jsonl.name}:{lineno}: sample file {ref[key]} is missing")
    regions = SAMPLES / "grounding" / "region_descriptions.json"  # Visual Genome's layout: {id}.jpg in images/
    for photo in json.loads(regions.read_text()):
        if not (SAMPLES / "images" / f"{photo['id']}.jpg").is_file():
            raise FileNotFoundError(f"{regions}: photo images/{photo['id']}.jpg is missing")


def prepare_all(data_dir: Path, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    manifests = {}
    for recipe in sorted(RECIPES.glob("*.yaml")):
        t = time.perf_counter()
        manifests[recipe.stem] = m = prepare(recipe, data_dir / recipe.stem, tokenizer_dir=TINY_TOKENIZERS)
        log(f"prepared {recipe.stem}: {m['samples']} samples, skipped {m['skipped'] or 0} "
            f"({time.perf_counter() - t:.1f}s)")
    return manifests


def corpus(data_dir: Path) -> list[str]:
    """Every text of the prepared data plus the templates' and chat markup's strings: what
    the tiny text tokenizer is trained on."""
    texts = list(PRETRAIN_TEMPLATES.values()) + [SYSTEM_STANDARD, SYSTEM_SPEECH, "user", "assistant", "system"]
    texts += list(GROUNDING_TASKS.values()) + list(GROUNDING_PRETRAIN.values())
    for shard in sorted(data_dir.glob("*/*.tar")):
        for s in iter_shard(str(shard)):
            segs = [x for t in s.turns for x in t.content] if s.turns is not None else s.segments
            texts += [x.text if isinstance(x, Text) else x.phrase for x in segs
                      if isinstance(x, Text) or (isinstance(x, Box) and x.phrase)]
    return texts


def build_base(data_dir: Path, out: Path) -> Path:
    """`mio tiny-base`: the tiny text-only base model, its tokenizer trained on ``data_dir``'s texts."""
    if not any(Path(data_dir).glob("*/*.tar")):
        raise FileNotFoundError(f"{data_dir}: no prepared datasets (<name>/*.tar) to train the text tokenizer on; "
                                f"run `mio prepare RECIPE --out {data_dir}/<name>` first")
    return build_tiny_backbone(corpus(Path(data_dir)), TinyLlamaConfig(), out)


def grounding_overrides(stage: Path) -> list[str]:
    """The settings that add the grounding task to a demo stage: location tokens where the backbone
    is extended, and the grounding dataset beside the stage's own."""
    args = ["--model.location_tokens={scheme: bins, size: 32}"] if stage.stem == "1_alignment" else []
    if stage.stem in GROUNDING_DATA:
        datasets = yaml.safe_load(stage.read_text())["data"]["datasets"]
        args.append("--data.datasets=" + json.dumps([*datasets, GROUNDING_DATA[stage.stem]]))
    return args


def run_stages(base: Path, data_dir: Path, out: Path, log: Callable[[str], None]) -> tuple[Path, list[dict[str, Any]]]:
    from mio.train.cli import fit

    backbone, stages = base, []
    for cfg in (STAGES / f"{name}.yaml" for name in DEMO_STAGES):
        t = time.perf_counter()
        log(f"stage {cfg.stem}: training from {backbone}")
        shutil.rmtree(out / cfg.stem, ignore_errors=True)  # a rerun into the same --out starts afresh
        backbone = fit(["--config", str(cfg), f"--model.backbone={backbone}", f"--data.root={data_dir}",
                        f"--trainer.default_root_dir={out / cfg.stem}", "--trainer.enable_progress_bar=false",
                        *STAGE_OVERRIDES.get(cfg.stem, []), *grounding_overrides(cfg)])
        stages.append({"stage": cfg.stem, "seconds": round(time.perf_counter() - t, 1)})
        log(f"stage {cfg.stem}: done in {stages[-1]['seconds']}s -> {backbone}")
    return backbone, stages


def run_demo(out: Path | None = None, log: Callable[[str], None] = print) -> Path:
    start = time.perf_counter()
    check_bundle()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="mio-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"mio demo -> {out}")
    data_dir = out / "data"
    manifests = prepare_all(data_dir, log)
    base = build_base(data_dir, out / "base")
    log(f"tiny base model -> {base}")
    final, stages = run_stages(base, data_dir, out, log)
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(final, model_dir)
    log(f"mio eval of {model_dir} on {data_dir / 'sft'}")
    generator = Generator(model_dir)
    metrics, rows = evaluate(generator, [data_dir / "sft"], EVAL, out / "eval", log)
    summary: dict[str, Any] = {key: metrics["tasks"].get(task, {}).get("exact", 0.0) for task, key in EVAL_TASKS.items()}
    log(f"mio eval of {model_dir} on {data_dir / 'sft'}: image generation with guidance 3")
    guided, _ = evaluate(Generator(model_dir), [data_dir / "sft"], EVAL_GUIDED, out / "eval_guidance3", log)
    summary["caption_to_image_exact_guidance3"] = guided["tasks"].get("image_generation", {}).get("exact", 0.0)

    grounding, grounding_rows = evaluate(generator, [data_dir / "grounding"], GROUNDING_EVAL, out / "eval_grounding", log)
    summary["refexp_accuracy"] = grounding["tasks"]["refexp"]["accuracy@0.5"]
    rows += grounding_rows
    logs = find_stages([out / s["stage"] for s in stages])
    summary["val_loss"] = logs[-1].last("val/loss")
    summary["eval"] = metrics["tasks"]
    summary["packing_efficiency"] = packing_efficiency(logs)
    summary["final_loss"] = final_loss(logs)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["stages"] = [{"stage": s["stage"], "seconds": s["seconds"]} for s in stages]
    summary["datasets"] = {k: {"samples": m["samples"], "skipped": m["skipped"]} for k, m in manifests.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out / "report.html", summary, stages, rows, metrics, data_dir, logs)
    return out / "report.html"


# --- report ------------------------------------------------------------------------------------
def _media_index(data_dir: Path) -> tuple[dict[bytes, str], dict[str, str]]:
    """Image codes -> bundled photo path, transcript -> bundled clip path (for display)."""
    captions = {json.loads(line)["caption"]: line for line in (SAMPLES / "image_text.jsonl").read_text().splitlines()}
    photos: dict[bytes, str] = {}
    for shard in list_shards(data_dir / "image_text"):
        for s in iter_shard(shard):
            img = next(x for x in s.segments if isinstance(x, Image))
            cap = next(x.text for x in s.segments if isinstance(x, Text))
            if cap in captions:
                photos[np.asarray(img.codes).tobytes()] = json.loads(captions[cap])["image"]
    clips = {json.loads(line)["text"]: json.loads(line)["audio"]
             for line in (SAMPLES / "speech_text.jsonl").read_text().splitlines()}
    return photos, clips


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _show(segs: list[Any], photos: dict[bytes, str], clips: dict[str, str]) -> str:
    parts = []
    for s in segs:
        if isinstance(s, Text):
            parts.append(html.escape(s.text))
        elif isinstance(s, Image):
            photo = photos.get(np.asarray(s.codes).astype(np.int64).tobytes())
            codes = " ".join(map(str, np.asarray(s.codes)[:8])) + " ..."
            if photo:
                parts.append(f'<img src="{_data_uri(SAMPLES / photo, "image/jpeg")}" width=112 title="{codes}">'
                             f"<br><small>codes of {html.escape(photo)}</small>")
            else:
                parts.append(f"<code>[image codes {codes}: no bundled photo has these codes]</code>")
        elif isinstance(s, Speech):
            parts.append(f"<code>[speech: {np.asarray(s.codes).shape[1]} frames]</code>")
        elif isinstance(s, Box):
            parts.append(f"<code>{html.escape(show([s]))}</code>")
    return " ".join(parts)


def write_report(path: Path, summary: dict[str, Any], stages: list[dict[str, Any]], answers: list[EvalAnswer],
                 metrics: dict[str, Any], data_dir: Path, logs: list[StageLog]) -> None:
    """The training report of the four stages (mio/report.py) with the demo's figures, its
    evaluation and its generations next to their targets."""
    photos, clips = _media_index(data_dir)
    rows = []
    for a in answers:
        prompt = [x for t in a.item.prompt for x in t.content]
        target = a.item.references[0]
        target_text = answer_text(target)
        audio = ""
        if a.item.task == "asr" and target_text in clips:
            audio = f'<audio controls src="{_data_uri(SAMPLES / clips[target_text], "audio/wav")}"></audio>'
        rows.append(f"<tr><td>{a.item.task}</td><td>{_show(prompt, photos, clips)}{audio}</td>"
                    f"<td>{_show(a.generation.segments, photos, clips)}</td><td>{_show(target, photos, clips)}</td>"
                    f"<td>{'yes' if a.scores['exact'] else 'NO'}</td></tr>")
    figures = "".join(f"<tr><td>{k}</td><td>{v:.3f}</td></tr>" for k, v in summary.items() if isinstance(v, float))
    stage_rows = "".join(f"<tr><td>{s['stage']}</td><td>{s['seconds']}</td></tr>" for s in stages)
    intro = f"""<p>Bundled photos and spoken clips were tokenized by the tiny SEED and SpeechTokenizer twins, written as
shards, and a tiny Llama was trained through the four stages with masked packing. Below: greedy, modality-constrained
generations of the final model on its memorised pairs. Tiny tokenizers have random weights, so images are shown as the
bundled photo whose codes the model produced.</p>
<h2>Figures</h2><table>{figures}</table>
<h2>Seconds per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>{stage_rows}</table>"""
    extra = f"""<h2>Evaluation (<code>mio eval</code>; every answer in eval/report.html)</h2>{metrics_table(metrics)}
<h2>Generations</h2><table><tr><th>task</th><th>prompt</th><th>generated</th><th>target</th><th>exact</th></tr>
{''.join(rows)}</table>"""
    write_training_report(path, logs, title="mio demo: a tiny any-to-any model, end to end", intro=intro, extra=extra)
