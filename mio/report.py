"""`mio report RUN_DIR...`: one HTML page on training runs, from the CSV logs `mio fit` writes.

A stage folder is a ``trainer.default_root_dir`` (it holds ``logs/version_*/metrics.csv``); a run
is one stage folder, several given in order, or a folder whose subfolders are stage folders (the
chain of a pipeline, such as `mio demo`'s run folder, in name order). A resumed stage has one log
version per start; a later version replaces the earlier one's steps from where it resumed.

The page: figures per stage (steps, final training and validation loss, packing efficiency, token
shares, throughput), then curves over the optimizer steps of the stages in sequence: loss (and
validation loss), loss per modality, learning rate, token share per modality, real tokens per
second, and the instability monitors (README "Long runs"): gradient norm before clipping with the
share of steps clipped, the largest |logit| and the mean logsumexp per modality, z-loss, skipped steps.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from mio.vocab import MODALITY_NAMES

METRICS = "logs/version_*/metrics.csv"
LOSS, VAL_LOSS = "train/loss", "val/loss"
PACKING, TOKENS_PER_S = "train/packing_efficiency", "train/tokens_per_sec"
GRAD_NORM, CLIPPED, SKIPPED = "train/grad_norm", "train/clipped_fraction", "train/skipped_steps"
LOGIT_MAX, LSE_MEAN, Z_LOSS = "train/logit_max", "train/lse_mean", "train/z_loss"
MODALITIES = tuple(MODALITY_NAMES.values())


@dataclass
class StageLog:
    name: str
    folder: Path
    rows: list[dict[str, float]]  # one per logged step, in step order: metric name -> value

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, NaNs (steps without that modality) left out."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r and not math.isnan(r[key])]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def mean(self, key: str) -> float:
        values = self.series(key)[1]
        return sum(values) / len(values) if values else float("nan")

    def last(self, key: str) -> float:
        values = self.series(key)[1]
        return values[-1] if values else float("nan")

    @property
    def lr_key(self) -> str | None:
        """The first learning rate Lightning's LearningRateMonitor logged (``lr-AdamW/pg1``...)."""
        return next((k for r in self.rows for k in r if k.startswith("lr-")), None)


def is_stage(folder: Path) -> bool:
    return any(folder.glob(METRICS))


def find_stages(paths: list[Path]) -> list[StageLog]:
    """The stage folders ``paths`` name, in order (a folder that is not a stage: its stage subfolders)."""
    stages = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        folders = [path] if is_stage(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_stage(p))
        if not folders:
            raise FileNotFoundError(f"{path}: no training logs ({METRICS}) in it or in its subfolders; "
                                    f"name a stage's trainer.default_root_dir")
        stages += [StageLog(f.name, f, read_metrics(f)) for f in folders]
    return stages


def read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    """A stage's logged rows, merged over its log versions (a resumed run starts a new version)."""
    rows: list[dict[str, float]] = []
    for path in sorted(stage_dir.glob(METRICS), key=_version):
        with open(path) as fh:
            new = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
        new = [r for r in new if "step" in r]
        if new:
            rows = [r for r in rows if r["step"] < new[0]["step"]] + new
    # Lightning writes one row per logging call at the same step (the learning rate apart): merge them.
    merged: dict[float, dict[str, float]] = {}
    for r in rows:
        merged.setdefault(r["step"], {}).update(r)
    return [merged[s] for s in sorted(merged)]


def _version(path: Path) -> int:
    match = re.search(r"version_(\d+)", str(path))
    return int(match.group(1)) if match else -1


def packing_efficiency(stages: list[StageLog]) -> float:
    """Mean packing efficiency over the logged steps of all stages."""
    values = [v for s in stages for v in s.series(PACKING)[1]]
    return sum(values) / len(values) if values else float("nan")


def final_loss(stages: list[StageLog]) -> float:
    return stages[-1].last(LOSS) if stages else float("nan")


def stage_figures(stage: StageLog) -> dict[str, float]:
    figures = {"steps": stage.rows[-1]["step"] + 1 if stage.rows else 0.0, "final loss": stage.last(LOSS),
               "final validation loss": stage.last(VAL_LOSS),
               "packing efficiency": stage.mean(PACKING), "real tokens/s": stage.mean(TOKENS_PER_S)}
    figures |= {f"{m} share": stage.mean(f"train/share_{m}") for m in MODALITIES}
    if stage.lr_key:
        figures["final lr"] = stage.last(stage.lr_key)
    if stage.series(GRAD_NORM)[0]:
        figures |= {"steps clipped": stage.mean(CLIPPED), "max logit": max(stage.series(LOGIT_MAX)[1], default=math.nan),
                    "skipped steps": stage.last(SKIPPED)}
    return figures


# --- page --------------------------------------------------------------------------------------
def _plot(stages: list[StageLog], metrics: dict[str, str], ylabel: str, log: bool = False,
          dashed: str | None = None) -> str:
    """Curves over the stages in sequence on one step axis, a base64 PNG ("" when nothing was
    logged). One metric: a line per stage, labelled by stage, and ``dashed`` (validation) in
    the stage's colour; several (label -> metric): a colour per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.0))
    offset, labelled = 0.0, set()
    for i, stage in enumerate(stages):
        for j, (label, key) in enumerate(metrics.items()):
            steps, values = stage.series(key)
            if not steps:
                continue
            name = stage.name if len(metrics) == 1 else label
            ax.plot([offset + x for x in steps], values, color=f"C{i if len(metrics) == 1 else j}",
                    label=None if name in labelled else name)
            labelled.add(name)
        steps, values = stage.series(dashed) if dashed else ([], [])
        if steps:
            ax.plot([offset + x for x in steps], values, "o--", color=f"C{i}", label=f"{stage.name} validation")
        if stage.rows:
            offset += stage.rows[-1]["step"] + 1
            if i < len(stages) - 1:
                ax.axvline(offset, color="#bbb", linewidth=0.8)
    if not labelled:
        plt.close(fig)
        return ""
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures_table(stages: list[StageLog]) -> str:
    figures = [stage_figures(s) for s in stages]
    names = list(dict.fromkeys(k for f in figures for k in f))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(f"<tr><td>{html.escape(s.name)}</td>" + "".join(f"<td>{_fmt(f.get(n))}</td>" for n in names)
                   + "</tr>" for s, f in zip(stages, figures))
    return f"<table><tr><th>stage</th>{head}</tr>{rows}</table>"


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def curves(stages: list[StageLog]) -> str:
    """The curves section of a report, as HTML."""
    lr = next((s.lr_key for s in stages if s.lr_key), None)
    plots = [("Loss (lines: training; dashed: validation on held-out data)",
              _plot(stages, {"loss": LOSS}, "loss (supervised tokens)", log=True, dashed=VAL_LOSS)),
             ("Loss per modality", _plot(stages, {m: f"train/loss_{m}" for m in MODALITIES}, "loss", log=True)),
             ("Learning rate", _plot(stages, {"learning rate": lr}, "learning rate") if lr else ""),
             ("Token shares", _plot(stages, {m: f"train/share_{m}" for m in MODALITIES}, "share of real tokens")),
             ("Throughput", _plot(stages, {"tokens/s": TOKENS_PER_S}, "real tokens per second")),
             ("Gradient norm before clipping", _plot(stages, {"gradient norm": GRAD_NORM}, "gradient norm", log=True)),
             ("Share of steps clipped", _plot(stages, {"clipped": CLIPPED}, "share of the logged steps")),
             ("Largest |logit| (supervised positions)", _plot(stages, {"max |logit|": LOGIT_MAX}, "max |logit|")),
             ("Mean logsumexp of the logits, per target modality",
              _plot(stages, {"all": LSE_MEAN, **{m: f"{LSE_MEAN}_{m}" for m in MODALITIES}}, "logsumexp")),
             ("z-loss", _plot(stages, {"z-loss": Z_LOSS}, "z-loss (weighted)", log=True)),
             ("Skipped steps (running total)", _plot(stages, {"skipped": SKIPPED}, "steps kept out of the weights"))]
    return "".join(f'<h2>{title}</h2><img src="data:image/png;base64,{png}">' for title, png in plots if png)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{border:1px solid #ccc;padding:4px;"
         "vertical-align:top}table{border-collapse:collapse}")


def write_report(out: Path, stages: list[StageLog], title: str = "mio training report", intro: str = "",
                 extra: str = "") -> Path:
    """The page: ``intro`` (HTML), the stage figures, the curves, then ``extra`` (HTML)."""
    folders = "".join(f"<li>{html.escape(s.name)}: <code>{html.escape(str(s.folder))}</code>, {len(s.rows)} logged "
                      f"steps</li>" for s in stages)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{intro}
<h2>Stages</h2><ul>{folders}</ul>{_figures_table(stages)}
{curves(stages)}
{extra}</body></html>
""")
    return out


def report_runs(paths: list[Path], out: Path | None = None) -> Path:
    """`mio report`: the page for the stages ``paths`` name; returns its path."""
    stages = find_stages(paths)
    return write_report(out or Path(paths[0]) / "report.html", stages)
