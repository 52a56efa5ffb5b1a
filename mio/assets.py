"""The declarative folders mio ships beside its code: stages/, tokenizers/ and data_recipes/ (with the
bundled samples `mio demo` prepares). They are the repository's own top-level folders, reached through
mio/bundled/, whose symbolic links setuptools follows when it builds a wheel: a source checkout and an
installed wheel find them at the same place."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled"
STAGES = BUNDLED / "stages"
TOKENIZER_SPECS = BUNDLED / "tokenizers"
DATA_RECIPES = BUNDLED / "data_recipes"
SHIPPED = ("stages", "tokenizers", "data_recipes")


def resolve_declarative(path: str | Path) -> Path:
    """`path` as given where it exists; else, for a relative path into one of the shipped folders
    (`tokenizers/tiny/seed.yaml`, `data_recipes/demo/...`), the copy mio ships. So the README's
    commands name the same files in a checkout and anywhere a wheel is installed."""
    p = Path(path)
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] not in SHIPPED:
        return p
    shipped = BUNDLED / p
    return shipped if shipped.exists() else p

