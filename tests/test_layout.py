"""The repository layout: `tokenizers/` is YAML only and never shadows Hugging Face's package."""

from pathlib import Path

import tokenizers

ROOT = Path(__file__).resolve().parents[1]


def test_import_tokenizers_is_huggingface():
    origin = Path(tokenizers.__file__).resolve()
    assert origin.parent != ROOT / "tokenizers", f"`import tokenizers` resolved to this repo: {origin}"
    assert hasattr(tokenizers, "Tokenizer")


def test_declarative_folders_have_no_python():
    for folder in ("tokenizers", "stages", "data_recipes"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must not be a Python package"
