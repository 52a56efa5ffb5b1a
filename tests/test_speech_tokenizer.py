"""SpeechCodec on real speech (espeak-ng), loading through SpeechTokenizer.load_from_checkpoint, and
a battery of bad audio files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mio.tokenizers import SpeechCodec, build_tokenizer, load_spec, tokenize_cli

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEECH = ROOT / "tokenizers" / "tiny" / "speechtokenizer.yaml"
REAL_SPEECH = ROOT / "tokenizers" / "speechtokenizer.yaml"
SENTENCES = [
    "The cat sat on the mat.",
    "A red rocket waits on the launch pad.",
    "Coffee in a white cup, please.",
]


@pytest.fixture(scope="module")
def codec() -> SpeechCodec:
    return build_tokenizer(TINY_SPEECH)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> list[Path]:
    """Real speech: espeak-ng's voice saying each sentence (22.05 kHz mono WAV)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps installs it)")
    folder = tmp_path_factory.mktemp("speech")
    paths = []
    for i, text in enumerate(SENTENCES):
        path = folder / f"sentence{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_real_speech_codes(codec: SpeechCodec, spoken: list[Path]) -> None:
    rate = sf.info(spoken[0]).samplerate
    assert rate != 16000  # so the resampling path runs
    waves = [codec.load_audio(p) for p in spoken]
    for path, wave in zip(spoken, waves):
        assert abs(wave.shape[0] - round(sf.info(path).frames * 16000 / rate)) <= 1
    codes = codec.encode([codec.load_audio(p) for p in spoken])
    for wave, c in zip(waves, codes):
        assert c.shape == (4, -(-wave.shape[0] // 320))
        assert len(set(c[0])) >= 10  # content codes vary along an utterance
    assert len({c[0].tobytes() for c in codes}) == 3
    np.testing.assert_array_equal(codec.encode([codec.load_audio(p) for p in spoken[:1]])[0], codes[0])  # deterministic


def test_decode_then_encode_content_layer_is_stable(codec: SpeechCodec, spoken: list[Path]) -> None:
    """Layer 0 alone: the decoded vectors are codebook rows, whose nearest row is themselves."""
    codes = torch.from_numpy(codec.encode([codec.load_audio(p) for p in spoken[:1]])[0][:1])[:, None, :]  # (1, 1, frames)
    with torch.inference_mode():
        rows = codec.model.quantizer.decode(codes)  # (1, D, frames)
        again = codec.model.quantizer.encode(rows, n_q=1)
    assert torch.equal(again, codes)
    wave = codec.decode(codes[:, 0, :].numpy())
    assert wave.shape == (codes.shape[-1] * 320,)


@pytest.mark.slow
def test_load_from_checkpoint_gives_same_codes(codec: SpeechCodec, spoken: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "SpeechTokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_spec(TINY_SPEECH)["model"]))
    torch.save(codec.model.state_dict(), folder / "SpeechTokenizer.pt")
    spec = load_spec(REAL_SPEECH) | {"root": str(tmp_path)}
    loaded = build_tokenizer(spec)
    for a, b in zip(loaded.encode([loaded.load_audio(p) for p in spoken]), codec.encode([codec.load_audio(p) for p in spoken])):
        np.testing.assert_array_equal(a, b)
    # a checkpoint that does not fit its config names both files
    small = {k: v for k, v in codec.model.state_dict().items() if not k.startswith("decoder.")}
    torch.save(small, folder / "SpeechTokenizer.pt")
    with pytest.raises(ValueError, match="SpeechTokenizer.pt does not fit .*config.json"):
        build_tokenizer(spec)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        build_tokenizer(spec)


def test_bad_audio_battery(codec: SpeechCodec, tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)

    # 8-bit unsigned, 44.1 kHz, stereo: read, downmixed and resampled, not refused
    u8 = tmp_path / "u8_stereo_44k.wav"
    sf.write(u8, np.stack([tone, -tone * 0.5], axis=1), 44100, subtype="PCM_U8")
    wave = codec.load_audio(u8)
    assert wave.shape == (16000,) and wave.dtype == np.float32
    assert 0.05 < np.abs(wave).max() < 0.3  # the channel mean of +tone and -tone/2
    assert codec.encode([codec.load_audio(u8)], names=[str(u8)])[0].shape == (4, 50)

    # truncated: a WAV whose samples stop before its header says
    whole = tmp_path / "whole.wav"
    sf.write(whole, tone, 44100, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: 44 + 20000])
    with pytest.raises(ValueError, match=r"cut.wav is truncated"):
        codec.encode([codec.load_audio(cut)], names=[str(cut)])
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(whole.read_bytes()[:30])
    with pytest.raises(ValueError, match="header_only.wav"):
        codec.encode([codec.load_audio(header_only)], names=[str(header_only)])

    # empty clip
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(ValueError, match="empty.wav is empty"):
        codec.encode([codec.load_audio(empty)], names=[str(empty)])

    # not audio at all
    noise = tmp_path / "noise.flac"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError, match="noise.flac cannot be decoded"):
        codec.encode([codec.load_audio(noise)], names=[str(noise)])

    # over 15 s: refused for pretraining, with the reason
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16 * 16000), 16000)
    with pytest.raises(ValueError, match=r"long.wav: the clip lasts 16.00 s, over the 15 s limit"):
        codec.encode([codec.load_audio(long)], names=[str(long)])


def test_tokenize_cli_speech(spoken: list[Path], tmp_path: Path) -> None:
    rows = list(tokenize_cli(str(TINY_SPEECH), [str(spoken[0]), str(tmp_path / "nothing.wav")]))
    assert rows[0]["kind"] == "speech" and len(rows[0]["codes"]) == 4
    assert rows[0]["frames"] == len(rows[0]["codes"][0]) == -(-round(rows[0]["seconds"] * 16000) // 320)
    assert "nothing.wav" in rows[1]["error"]
    json.dumps(rows)
