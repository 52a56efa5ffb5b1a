"""`mio eval`'s HTML page: the metrics per task, then every item's prompt, answer, references
and scores (decoded media shown where a metric used them)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence


def metrics_table(metrics: dict[str, Any]) -> str:
    """The per-task figures as an HTML table (also used by the demo's report)."""
    names = sorted({k for figures in metrics["tasks"].values() for k in figures if k != "items"})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for task, figures in metrics["tasks"].items():
        cells = "".join(f"<td>{figures[n]:.4g}</td>" if n in figures else "<td>-</td>" for n in names)
        body.append(f"<tr><td>{html.escape(task)}</td><td>{figures['items']}</td>{cells}</tr>")
    notes = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in metrics.get("not_computed", {}).items())
    skipped = "".join(f"<li>{html.escape(k)}: {v} samples</li>" for k, v in metrics.get("skipped_samples", {}).items())
    missing = "".join(f"<li>{html.escape(t)}: no sample in the data</li>" for t in metrics.get("missing_tasks", []))
    extra = f"<ul>{notes}{skipped}{missing}</ul>" if notes or skipped or missing else ""
    return f"<table><tr><th>task</th><th>items</th>{head}</tr>{''.join(body)}</table>{extra}"


def _media(files: Sequence[str]) -> str:
    out = []
    for f in files:
        src = html.escape(f)
        out.append(f'<audio controls src="{src}"></audio>' if f.endswith(".wav") else f'<img src="{src}" width=128>')
    return "<br>".join(out)


def write_html(path: Path, rows: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> None:
    lines = []
    for r in rows:
        scores = ", ".join(f"{k} {v:.3g}" for k, v in r["scores"].items())
        heard = f"<br><small>heard: {html.escape(r['transcript'])}</small>" if "transcript" in r else ""
        note = f"<br><small>{html.escape(r['note'])}</small>" if "note" in r else ""
        refs = "<br>".join(html.escape(x) for x in r["references"])
        lines.append(f"<tr><td>{html.escape(r['task'])}</td><td><pre>{html.escape(r['prompt'])}</pre></td>"
                     f"<td>{html.escape(r['answer'])}{_media(r['media'])}{heard}{note}</td><td>{refs}</td>"
                     f"<td>{html.escape(scores)}</td></tr>")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>mio eval</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}pre{{white-space:pre-wrap;margin:0}}</style></head><body>
<h1>mio eval: {html.escape(str(metrics['model']))}</h1>
<p>Data: {html.escape(', '.join(metrics['data']))}. {len(rows)} items in {metrics['seconds']} s.</p>
<h2>Metrics</h2>{metrics_table(metrics)}
<h2>Answers</h2><table><tr><th>task</th><th>prompt</th><th>answer</th><th>references</th><th>scores</th></tr>
{''.join(lines)}</table></body></html>
""")
