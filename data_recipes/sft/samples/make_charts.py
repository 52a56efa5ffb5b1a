"""Make the three chart images of ``chart_understanding.jsonl`` (run once; the JPEGs are committed).

Run from the repository root: ``python data_recipes/sft/samples/make_charts.py``. The numbers in
``CHARTS`` are the ones the conversations ask about; matplotlib (a mio dependency) draws them
as 224x224 RGB JPEGs, the size the image tokenizer reads.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the non-interactive backend)

HERE = Path(__file__).resolve().parent
SIZE_INCHES, DPI = 2.24, 100  # 224 x 224 pixels

CHARTS: dict[str, tuple[str, list[str], list[float]]] = {
    "rainfall_bar": ("Rainfall (mm)", ["Jan", "Feb", "Mar", "Apr"], [80, 55, 30, 95]),
    "visitors_line": ("Visitors (thousands)", ["2020", "2021", "2022", "2023"], [12, 18, 25, 21]),
    "energy_pie": ("Energy mix (%)", ["wind", "solar", "gas"], [50, 30, 20]),
}


def draw(name: str, title: str, labels: list[str], values: list[float]) -> Path:
    fig, ax = plt.subplots(figsize=(SIZE_INCHES, SIZE_INCHES), dpi=DPI)
    if name.endswith("_bar"):
        ax.bar(labels, values, color="tab:blue")
    elif name.endswith("_line"):
        ax.plot(labels, values, marker="o", color="tab:red")
    else:
        ax.pie(values, labels=labels, colors=["tab:green", "gold", "tab:gray"], textprops={"fontsize": 7})
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    out = HERE / "charts" / f"{name}.jpg"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=DPI, pil_kwargs={"quality": 90})
    plt.close(fig)
    return out


def main() -> None:
    for name, (title, labels, values) in CHARTS.items():
        print(draw(name, title, labels, values))


if __name__ == "__main__":
    main()
