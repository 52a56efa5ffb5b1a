"""Detokenizers: a tiny random unCLIP pipeline built from diffusers' component classes (no
download), SEED codes -> embeddings -> images, speech codes -> WAV, frames -> GIF."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image as PILImage
from test_generate_support import one_thread, tiny_media, tiny_unclip  # noqa: F401 (autouse fixture)

from mio.generate.detok import (
    ImageDecoder,
    SpeechDecoder,
    TinyUnclipConfig,
    UnclipSettings,
    load_unclip_pipeline,
    tiny_unclip_pipeline,
    write_gif,
    write_wav,
)

FEW_STEPS = UnclipSettings(steps=2)


def pixels(im: PILImage.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def run(pipe, embeds: torch.Tensor, seed: int, steps: int = 2) -> np.ndarray:
    out = pipe(image_embeds=embeds, prompt="", num_inference_steps=steps, guidance_scale=10.0, noise_level=0,
               generator=torch.Generator().manual_seed(seed))
    return pixels(out.images[0])


def test_tiny_unclip_is_seeded_and_conditioned_on_the_embedding():
    pipe = tiny_unclip()
    e = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    a, b = run(pipe, e, seed=0), run(pipe, e, seed=0)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, run(pipe, e, seed=1))  # the seed draws the noise
    assert not np.array_equal(a, run(pipe, -e, seed=0))  # the embedding steers the image
    rebuilt = tiny_unclip_pipeline(TinyUnclipConfig(embed_dim=64))  # same seed -> same weights
    assert np.array_equal(a, run(rebuilt, e, seed=0))


def test_unclip_folder_round_trip(tmp_path):
    """A saved pipeline (the layout of MIO's stable-diffusion-2-1-unclip/) loads from disk only."""
    pipe = tiny_unclip()
    pipe.save_pretrained(tmp_path / "unclip")
    loaded = load_unclip_pipeline(tmp_path / "unclip", device=torch.device("cpu"))
    e = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(run(pipe, e, seed=5), run(loaded, e, seed=5))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_unclip_pipeline(tmp_path / "nothing")


def test_image_decoder_codes_to_images():
    image_tok = tiny_media().get("image")
    dec = ImageDecoder(image_tok, tiny_unclip(), FEW_STEPS)
    codes = np.random.default_rng(0).integers(0, 8192, (3, 32))
    emb = dec.embeddings(codes)
    assert emb.shape == (3, image_tok.embed_dim)
    assert torch.equal(emb, image_tok.decode_embeddings(codes))  # the SEED decoder head's output, unchanged
    images = dec.decode(codes)
    assert len(images) == 3 and all(im.size == (32, 32) for im in images)
    # Each frame is decoded on its own, with the same seed: deterministic and independent of the
    # batch (up to the SEED head's float rounding, 1e-7, which may flip a pixel by one level).
    alone = dec.decode(codes[1:2])[0]
    assert np.abs(pixels(images[1]) - pixels(alone)).max() <= 1
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    with pytest.raises(ValueError, match="outside the codebook"):
        dec.decode(np.full((1, 32), 9000))


def test_image_decoder_refuses_an_unclip_of_another_size():
    small = tiny_unclip_pipeline(TinyUnclipConfig(embed_dim=16))
    with pytest.raises(ValueError, match="64-d image embeddings.*16-d"):
        ImageDecoder(tiny_media().get("image"), small)


def test_speech_codes_to_wav(tmp_path):
    codec = tiny_media().get("speech")
    dec = SpeechDecoder(codec)
    codes = np.random.default_rng(1).integers(0, 1024, (4, 7))
    wave = dec.decode(codes)
    assert wave.shape == (7 * 320,) and wave.dtype == np.float32 and dec.sample_rate == 16000
    write_wav(tmp_path / "s.wav", wave, dec.sample_rate)
    back, sr = sf.read(tmp_path / "s.wav", dtype="float32")
    assert sr == 16000 and back.shape == wave.shape
    assert np.abs(back - np.clip(wave, -1, 1)).max() < 2 / 32768  # 16-bit PCM
    assert np.array_equal(dec.decode(codes[:1]), codec.decode(codes[:1]))  # content layer alone decodes too


def test_video_frames_to_gif(tmp_path):
    frames = [PILImage.new("RGB", (32, 32), (40 * i, 0, 255 - 40 * i)) for i in range(4)]
    write_gif(tmp_path / "v.gif", frames, frame_ms=250)
    with PILImage.open(tmp_path / "v.gif") as gif:
        assert gif.is_animated and gif.n_frames == 4 and gif.info["duration"] == 250
        gif.seek(3)
        assert pixels(gif)[0, 0, 0] > 100
    with pytest.raises(ValueError, match="at least one frame"):
        write_gif(tmp_path / "empty.gif", [])
