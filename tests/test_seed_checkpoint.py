"""The full-size SEED module against the reference's key manifest (meta device), and strict loading
of released-style checkpoint files (tiny ones, written here)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mio.tokenizers import ImageTokenizer, MissingCheckpointError, build_tokenizer, load_spec
from mio.tokenizers.checkpoints import IGNORED_KEY_PATTERNS
from mio.tokenizers.seed import SeedConfig, SeedQuantizer

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((Path(__file__).parent / "data" / "seed_reference_keys.json").read_text())
REAL_SEED = ROOT / "tokenizers" / "seed.yaml"
TINY_SEED = ROOT / "tokenizers" / "tiny" / "seed.yaml"
IGNORED = re.compile("|".join(IGNORED_KEY_PATTERNS))


@pytest.fixture(scope="module")
def full_size() -> SeedQuantizer:
    with torch.device("meta"):
        return SeedQuantizer(SeedConfig.from_dict(load_spec(REAL_SEED)["model"]))


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_full_size_module_matches_reference_manifest(full_size: SeedQuantizer) -> None:
    ours = shapes(full_size)
    reference = MANIFEST["model"]
    dropped = sorted(set(reference) - set(ours))
    assert set(ours) <= set(reference), sorted(set(ours) - set(reference))
    # what we leave out: the training-only recon_s blocks and pos_embed, and BERT's position_ids
    assert all(IGNORED.search(k) for k in dropped), [k for k in dropped if not IGNORED.search(k)]
    assert {k.split(".")[0] for k in dropped} == {"blocks", "pos_embed", "Qformer"}
    assert [k for k in dropped if k.startswith("Qformer")] == ["Qformer.bert.embeddings.position_ids"]
    mismatched = {k: (v, reference[k]) for k, v in ours.items() if v != reference[k]}
    assert not mismatched
    assert len(dropped) == 4 * 12 + 2  # 4 recon blocks of 12 tensors, pos_embed, position_ids


def test_full_size_vit_matches_eva_vit_g_keys(full_size: SeedQuantizer) -> None:
    assert shapes(full_size.visual_encoder) == MANIFEST["eva_vit_g.pth"]


def test_full_size_figures(full_size: SeedQuantizer) -> None:
    vit = sum(p.numel() for p in full_size.visual_encoder.parameters())
    assert 980e6 < vit < 990e6  # EVA ViT-g without its last block: ~985M parameters
    assert full_size.quantize.embedding.weight.shape == (8192, 32)
    assert full_size.distill_image_proj.out_features == 1024


# ---------------------------------------------------------------------- loading (tiny files)


@pytest.fixture(scope="module")
def tiny() -> ImageTokenizer:
    return build_tokenizer(TINY_SEED)


def write_release(model: SeedQuantizer, folder: Path, drop: str | None = None, extra: dict | None = None) -> dict:
    """Split a state dict like the release: ViT keys (unprefixed) in eva_vit_g.pth, the rest in
    seed_quantizer.pt, plus keys the reference's module drops (text branch, training blocks)."""
    state = model.state_dict()
    vit = {k.removeprefix("visual_encoder."): v for k, v in state.items() if k.startswith("visual_encoder.")}
    quant = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    hidden = model.config.qformer.hidden
    quant |= {
        "Qformer.cls.predictions.bias": torch.zeros(30522),
        "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(30522, hidden),
        "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(8, hidden),
        "blocks.0.attn.qkv.weight": torch.zeros(3 * hidden, hidden),
        "pos_embed": torch.zeros(1, 32, hidden),
    } | (extra or {})
    for part in (vit, quant):
        part.pop(drop, None)
        part.pop(drop.removeprefix("visual_encoder.") if drop else None, None)
    (folder / "seed-tokenizer-2").mkdir(parents=True, exist_ok=True)
    torch.save(vit, folder / "seed-tokenizer-2" / "eva_vit_g.pth")
    torch.save(quant, folder / "seed-tokenizer-2" / "seed_quantizer.pt")
    spec = load_spec(TINY_SEED)
    spec.pop("seed")
    real = load_spec(REAL_SEED)
    return spec | {"root": str(folder), "quantizer": real["quantizer"], "vit": real["vit"]}


def test_loads_release_layout_and_gives_same_codes(tiny: ImageTokenizer, tmp_path: Path) -> None:
    source = tiny.model
    spec = write_release(source, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys the reference ignores are accepted silently
        loaded = build_tokenizer(spec)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    np.testing.assert_array_equal(loaded.encode(images), tiny.encode(images))


def test_missing_key_is_an_error_naming_key_and_file(tiny: ImageTokenizer, tmp_path: Path) -> None:
    spec = write_release(tiny.model, tmp_path, drop="quantize.embedding.weight")
    with pytest.raises(ValueError, match=r"seed_quantizer.pt lacks 1: \['quantize.embedding.weight'\]"):
        build_tokenizer(spec)
    spec = write_release(tiny.model, tmp_path, drop="visual_encoder.blocks.1.attn.q_bias")
    with pytest.raises(ValueError, match=r"eva_vit_g.pth lacks 1: \['blocks.1.attn.q_bias'\]"):
        build_tokenizer(spec)


def test_unknown_key_is_reported(tiny: ImageTokenizer, tmp_path: Path) -> None:
    spec = write_release(tiny.model, tmp_path, extra={"surprise.weight": torch.zeros(3)})
    with pytest.warns(UserWarning, match="surprise.weight"):
        build_tokenizer(spec)


def test_shape_mismatch_is_an_error(tiny: ImageTokenizer, tmp_path: Path) -> None:
    spec = write_release(tiny.model, tmp_path, extra={"query_tokens": torch.zeros(1, 16, 64)})
    with pytest.raises(ValueError, match=r"query_tokens: file \(1, 16, 64\) vs model \(1, 32, 64\)"):
        build_tokenizer(spec)


def test_corrupt_checkpoint_names_the_file(tiny: ImageTokenizer, tmp_path: Path) -> None:
    spec = write_release(tiny.model, tmp_path)
    (tmp_path / "seed-tokenizer-2" / "seed_quantizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="seed_quantizer.pt cannot be read"):
        build_tokenizer(spec)


@pytest.mark.parametrize(
    "spec_name, expected",
    [
        ("seed.yaml", ["seed-tokenizer-2/seed_quantizer.pt", "seed-tokenizer-2/eva_vit_g.pth"]),
        ("speechtokenizer.yaml", ["SpeechTokenizer/config.json", "SpeechTokenizer/SpeechTokenizer.pt"]),
        ("video.yaml", ["seed-tokenizer-2/seed_quantizer.pt", "seed-tokenizer-2/eva_vit_g.pth"]),
    ],
)
def test_missing_checkpoints_one_error_naming_every_path(spec_name, expected, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the real specs' root is relative to the current directory
    with pytest.raises(MissingCheckpointError) as err:
        build_tokenizer(ROOT / "tokenizers" / spec_name)
    message = str(err.value)
    for path in expected:
        assert str(Path("checkpoints/MIO") / path) in message
    assert "Nothing is downloaded" in message


def test_preprocessing_normalises_with_clip_statistics(tiny: ImageTokenizer) -> None:
    tok = tiny
    gray = Image.new("RGB", (300, 200), (128, 64, 200))
    pixels = tok.preprocess(gray)
    assert pixels.shape == (3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor([128, 64, 200]) / 255.0 - mean) / std
    torch.testing.assert_close(pixels, expected.view(3, 1, 1).expand(3, 32, 32))
    # bilinear (MIO's default) and bicubic (SEED's processor) differ on a detailed image
    rng = np.random.default_rng(1)
    detailed = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    bicubic = ImageTokenizer(tok.model, interpolation="bicubic")
    assert not torch.allclose(tok.preprocess(detailed), bicubic.preprocess(detailed))
    with pytest.raises(ValueError, match="interpolation"):
        build_tokenizer(load_spec(TINY_SEED) | {"interpolation": "nearest"})
