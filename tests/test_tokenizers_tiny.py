"""Tiny modality tokenizers: deterministic from their seed, and their codes carry information."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw, ImageFilter

from mio.tokenizers import ImageTokenizer, SpeechCodec, build_tokenizer, load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY_SEED = ROOT / "tokenizers" / "tiny" / "seed.yaml"
TINY_SPEECH = ROOT / "tokenizers" / "tiny" / "speechtokenizer.yaml"


# ---------------------------------------------------------------------- media made here


def natural_ish_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Scenes of sky/ground gradients, blurred blobs and textured shapes, all different."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = int(rng.integers(96, 200)), int(rng.integers(96, 200))
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0, 1, h)[:, None, None]
        pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((h, w, 3))
        pixels += rng.normal(0, 6, (h, w, 3))  # sensor-like noise
        im = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(15, w // 2 + 16)), y0 + int(rng.integers(15, h // 2 + 16))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x1, y1], fill=colour)
            else:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
        images.append(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2)))))
    return images


def speechlike_clips(n: int, seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Vowel-like harmonic tones with gliding pitch, separated by noise and pauses."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        t = np.arange(int(seconds * sr)) / sr
        f0 = rng.uniform(90, 260) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(rng.uniform(0.1, 1) / k * np.sin(k * phase) for k in range(1, 8))
        gate = (np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6)) > -0.3).astype(float)
        wave = voiced * gate + (1 - gate) * rng.normal(0, 0.05, t.shape)
        clips.append((0.4 * wave / np.abs(wave).max()).astype(np.float32))
    return clips


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_tok() -> ImageTokenizer:
    return build_tokenizer(TINY_SEED)


@pytest.fixture(scope="module")
def speech_tok() -> SpeechCodec:
    return build_tokenizer(TINY_SPEECH)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return natural_ish_images(20)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return speechlike_clips(20)


# ---------------------------------------------------------------------- image


def test_tiny_image_interface(image_tok: ImageTokenizer) -> None:
    assert isinstance(image_tok, ImageTokenizer)
    assert image_tok.codebook_size == 8192  # the real vocabulary's image code count
    assert image_tok.tokens_per_image == 32
    assert image_tok.embed_dim == load_spec(TINY_SEED)["model"]["image_features_dim"]


def test_tiny_image_codes_shape_range_and_diversity(image_tok: ImageTokenizer, images) -> None:
    codes = image_tok.encode(images)
    assert codes.shape == (20, 32) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8192
    distinct_per_image = [len(set(row)) for row in codes]
    assert min(distinct_per_image) >= 8, distinct_per_image
    assert len({tuple(row) for row in codes}) == 20  # every image its own sequence
    assert len(np.unique(codes)) >= 200  # many codebook entries in use across the set


def test_tiny_image_same_image_same_codes_batched_or_not(image_tok: ImageTokenizer, images) -> None:
    together = image_tok.encode(images[:5])
    alone = np.concatenate([image_tok.encode([im]) for im in images[:5]])
    np.testing.assert_array_equal(together, alone)


@pytest.mark.slow
def test_tiny_image_build_is_deterministic(image_tok: ImageTokenizer, images) -> None:
    again = build_tokenizer(load_spec(TINY_SEED))
    for (k, a), (k2, b) in zip(image_tok.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    np.testing.assert_array_equal(image_tok.encode(images[:4]), again.encode(images[:4]))


def test_tiny_image_other_seed_other_model(images) -> None:
    spec = load_spec(TINY_SEED) | {"seed": 1}
    other = build_tokenizer(spec)
    base = build_tokenizer(TINY_SEED)
    assert not np.array_equal(other.encode(images[:4]), base.encode(images[:4]))


def test_tiny_image_codebook_rows_quantize_to_themselves(image_tok: ImageTokenizer) -> None:
    book = image_tok.model.quantize.embedding.weight  # (8192, 32)
    assert len(torch.unique(book, dim=0)) == 8192  # no duplicate rows: every code reachable
    with torch.inference_mode():
        nearest = image_tok.model.quantize.nearest(book[None])[0]
    assert torch.equal(nearest, torch.arange(8192))


def test_tiny_image_decode_embeddings(image_tok: ImageTokenizer, images) -> None:
    codes = image_tok.encode(images[:3])
    emb = image_tok.decode_embeddings(codes)
    assert emb.shape == (3, image_tok.embed_dim) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])  # different codes, different embeddings
    torch.testing.assert_close(image_tok.decode_embeddings(codes[:1])[0], emb[0])


def test_tiny_image_decode_rejects_bad_codes(image_tok: ImageTokenizer) -> None:
    codes = np.zeros((2, 32), dtype=np.int64)
    codes[1, 5] = 8192
    with pytest.raises(ValueError, match=r"8192 \(image 1, position 5\)"):
        image_tok.decode_embeddings(codes)
    with pytest.raises(ValueError, match="shape"):
        image_tok.decode_embeddings(np.zeros((2, 31), dtype=np.int64))


def test_tiny_image_encodes_paths_and_names_bad_files(image_tok: ImageTokenizer, images, tmp_path) -> None:
    good = tmp_path / "scene.png"
    images[0].save(good)
    np.testing.assert_array_equal(image_tok.encode([good]), image_tok.encode([images[0]]))
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_tok.encode([tmp_path / "nowhere.png"])
    broken = tmp_path / "broken.jpg"
    images[1].save(tmp_path / "whole.jpg")
    broken.write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])  # a JPEG cut short
    with pytest.raises(ValueError, match="broken.jpg"):
        image_tok.encode([broken])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        image_tok.encode([text])


# ---------------------------------------------------------------------- speech


def test_tiny_speech_interface(speech_tok: SpeechCodec) -> None:
    from speechtokenizer import SpeechTokenizer

    assert isinstance(speech_tok.model, SpeechTokenizer)  # the package's real class
    assert (speech_tok.sample_rate, speech_tok.codebook_size, speech_tok.num_layers) == (16000, 1024, 4)
    assert speech_tok.frame_rate == 50 and speech_tok.hop_length == 320


def test_tiny_speech_codes_shape_range_and_diversity(speech_tok: SpeechCodec, clips) -> None:
    codes = speech_tok.encode(clips)
    assert len(codes) == 20
    for c in codes:
        assert c.shape == (4, 100) and c.dtype == np.int64
        assert c.min() >= 0 and c.max() < 1024
    content = [c[0] for c in codes]
    assert len({c.tobytes() for c in content}) == 20  # every clip its own content codes
    assert min(len(set(c)) for c in content) >= 8  # not collapsed onto a few codes
    for layer in range(4):  # every RVQ layer in use, not stuck on code 0
        assert len(np.unique(np.stack([c[layer] for c in codes]))) >= 50, layer


@pytest.mark.slow
def test_tiny_speech_batches_clips_of_different_lengths(speech_tok: SpeechCodec, clips) -> None:
    waves = [clips[0], clips[1][:12345], clips[2][:700], clips[3]]
    together = speech_tok.encode(waves)
    assert [c.shape[1] for c in together] == [100, 39, 3, 100]  # ceil(T / 320) frames
    for wave, codes in zip(waves, together):
        np.testing.assert_array_equal(speech_tok.encode([wave])[0], codes)


@pytest.mark.slow
def test_tiny_speech_build_is_deterministic(speech_tok: SpeechCodec, clips) -> None:
    again = build_tokenizer(load_spec(TINY_SPEECH))
    for (k, a), (k2, b) in zip(speech_tok.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for a, b in zip(speech_tok.encode(clips[:3]), again.encode(clips[:3])):
        np.testing.assert_array_equal(a, b)


def test_tiny_speech_codebook_filled(speech_tok: SpeechCodec) -> None:
    for layer in speech_tok.model.quantizer.vq.layers:
        book = layer._codebook
        assert bool(book.inited) and len(torch.unique(book.embed, dim=0)) == 1024
        assert torch.equal(book.quantize(book.embed), torch.arange(1024))  # rows quantize to themselves


def test_tiny_speech_decode_waveform(speech_tok: SpeechCodec, clips) -> None:
    codes = speech_tok.encode(clips[:1])[0]
    for layers in (1, 4):
        wave = speech_tok.decode(codes[:layers])
        assert wave.shape == (100 * 320,) and wave.dtype == np.float32
        assert np.isfinite(wave).all()
    with pytest.raises(ValueError, match="outside the codebook"):
        speech_tok.decode(np.full((4, 10), 1024))
    with pytest.raises(ValueError, match="shape"):
        speech_tok.decode(np.zeros((5, 10), dtype=np.int64))


def test_tiny_speech_refuses_empty_and_long_clips(speech_tok: SpeechCodec) -> None:
    with pytest.raises(ValueError, match="clip 1: the clip is empty"):
        speech_tok.encode([np.zeros(320, np.float32), np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="15 s limit"):
        speech_tok.encode([np.zeros(16 * 16000, np.float32)])
    assert speech_tok.refusal(np.zeros(15 * 16000, np.float32)) is None


def test_tiny_speech_files(speech_tok: SpeechCodec, clips, tmp_path) -> None:
    # 44.1 kHz stereo 16-bit: downmixed to mono, resampled to 16 kHz
    stereo = np.stack([clips[0], clips[0]], axis=1)
    import torchaudio.functional as AF

    at_44k = AF.resample(torch.from_numpy(stereo.T.copy()), 16000, 44100).numpy().T
    path = tmp_path / "stereo.wav"
    sf.write(path, at_44k, 44100, subtype="PCM_16")
    wave = speech_tok.load_audio(path)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(wave.shape[0] - 32000) <= 1
    codes = speech_tok.encode([speech_tok.load_audio(path)], names=[str(path)])[0]
    assert codes.shape[0] == 4 and codes.shape[1] == -(-wave.shape[0] // 320)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        speech_tok.load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0,), np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav"):
        speech_tok.encode([speech_tok.load_audio(empty)], names=[str(empty)])


def test_factory_rejects_unknown_kind(tmp_path) -> None:
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer({"kind": "jpeg2000"})
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        build_tokenizer(tmp_path / "absent.yaml")


@pytest.mark.gpu
def test_tiny_tokenizers_on_cuda_match_cpu(images, clips) -> None:
    on_gpu = build_tokenizer(load_spec(TINY_SEED) | {"device": "cuda", "dtype": "float32"})
    on_cpu = build_tokenizer(load_spec(TINY_SEED) | {"device": "cpu"})
    agree = (on_gpu.encode(images) == on_cpu.encode(images)).mean()
    assert agree > 0.95  # float rounding may move a vector across a Voronoi boundary, rarely
    speech_gpu = build_tokenizer(load_spec(TINY_SPEECH) | {"device": "cuda"})
    speech_cpu = build_tokenizer(load_spec(TINY_SPEECH) | {"device": "cpu"})
    a, b = speech_gpu.encode(clips[:4]), speech_cpu.encode(clips[:4])
    assert np.mean([(x == y).mean() for x, y in zip(a, b)]) > 0.95
    assert speech_gpu.decode(a[0]).shape == (100 * 320,)
