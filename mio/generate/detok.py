"""Detokenizers: generated codes back to media.

- image: 32 SEED codes -> SEED decoder head -> one unCLIP image embedding -> diffusers'
  ``StableUnCLIPImg2ImgPipeline`` with the embedding passed in (noise level 0, guidance 10,
  20 steps by default, seeded) -> PIL image;
- speech: (layers, frames) codes -> SpeechTokenizer decoder -> 16 kHz waveform -> WAV;
- video: (frames, 32) codes -> one image per frame (same seed, so frames share their noise)
  -> animated GIF.

The unCLIP pipeline is MIO's ``stable-diffusion-2-1-unclip`` folder, loaded from disk only; a
tiny SEED spec (random weights) pairs with a tiny random pipeline built from diffusers'
component classes, whose embedding size matches the tiny SEED decoder head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from mio.tokenizers.media_tokenizers import MIO_UNCLIP_DIR, MediaTokenizers, MissingTokenizerError, SpecSource
from mio.userio import MioUserError
from mio.vocab import IMAGE


@dataclass(frozen=True)
class UnclipSettings:
    """unCLIP sampling, as MIO's release runs it."""

    steps: int = 20
    guidance_scale: float = 10.0
    noise_level: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MioUserError(f"unCLIP steps must be at least 1, got {self.steps}")
        if self.noise_level < 0:
            raise MioUserError(f"unCLIP noise level must be >= 0, got {self.noise_level}")


DEFAULT_UNCLIP = UnclipSettings()


@dataclass(frozen=True)
class TinyUnclipConfig:
    """A random unCLIP pipeline small enough for tests: 32x32 images in well under a second a step."""

    embed_dim: int
    seed: int = 0
    latent_size: int = 16  # the VAE halves it once: images are 2 * latent_size pixels square
    text_hidden: int = 32
    unet_channels: tuple[int, int] = (16, 32)
    vae_channels: tuple[int, int] = (8, 16)


def tiny_unclip_pipeline(cfg: TinyUnclipConfig) -> Any:
    """A ``StableUnCLIPImg2ImgPipeline`` from diffusers' and transformers' component classes with
    small configs and weights drawn from ``cfg.seed``; nothing is downloaded."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": i + 2 for i, c in enumerate(letters)}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden, num_hidden_layers=1,
            num_attention_heads=2, projection_dim=cfg.text_hidden, max_position_embeddings=16,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        # Never run (the embedding is passed in), but a pipeline folder must hold one.
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden, projection_dim=cfg.embed_dim,
            num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16))
        unet = UNet2DConditionModel(
            sample_size=cfg.latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=cfg.unet_channels, norm_num_groups=8, attention_head_dim=(2, 4),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cfg.text_hidden, class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * cfg.embed_dim,  # the embedding and its noise-level embedding
            upcast_attention=True, use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=cfg.vae_channels, norm_num_groups=8, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            sample_size=2 * cfg.latent_size)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=cfg.embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16),
        text_encoder=text_encoder, unet=unet, vae=vae,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unclip_pipeline(folder: str | os.PathLike, device: torch.device | None = None,
                         dtype: torch.dtype | None = None) -> Any:
    """MIO's ``stable-diffusion-2-1-unclip`` (or any saved ``StableUnCLIPImg2ImgPipeline``) from disk,
    in ``dtype`` (default: float16 on CUDA, as MIO runs it; float32 on CPU)."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"unCLIP folder {path} has no model_index.json; put MIO's {MIO_UNCLIP_DIR}/ there")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unclip_for(media: MediaTokenizers, device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[Any, str]:
    """The unCLIP pipeline that goes with a model's image tokenizer -> (pipeline, where it came from).

    In order: an explicit folder (``--unclip`` or the tokenizers tree's), the image spec's
    ``unclip`` entry (a folder relative to its root, or a tiny config), a tiny random pipeline
    for a tiny (seeded) SEED spec, and ``<root>/stable-diffusion-2-1-unclip`` of a real one.
    """
    if media.unclip is not None:
        return load_unclip_pipeline(media.unclip, device, dtype), str(media.unclip)
    if IMAGE not in media.specs:
        raise MissingTokenizerError(media.why_missing(IMAGE))
    source: SpecSource = media.specs[IMAGE]
    spec = source.parsed()
    entry = spec.get("unclip")
    if isinstance(entry, dict):
        cfg = TinyUnclipConfig(embed_dim=_seed_embed_dim(spec), **entry)
        return tiny_unclip_pipeline(cfg), f"a tiny random unCLIP pipeline (seed {cfg.seed}) from {source.origin}"
    if entry is not None:
        folder = source.base_dir() / str(entry)
        return load_unclip_pipeline(folder, device, dtype), str(folder)
    if "seed" in spec:
        cfg = TinyUnclipConfig(embed_dim=_seed_embed_dim(spec), seed=int(spec["seed"]))
        return tiny_unclip_pipeline(cfg), f"a tiny random unCLIP pipeline (seed {cfg.seed}) for the tiny SEED of {source.origin}"
    folder = source.base_dir() / MIO_UNCLIP_DIR
    return load_unclip_pipeline(folder, device, dtype), str(folder)


def _seed_embed_dim(spec: dict[str, Any]) -> int:
    from mio.tokenizers.seed import SeedConfig

    return SeedConfig.from_dict(spec.get("model", {})).image_features_dim


class ImageDecoder:
    """Image codes -> images through the SEED decoder head and an unCLIP pipeline."""

    def __init__(self, image_tokenizer: Any, pipeline: Any, settings: UnclipSettings = DEFAULT_UNCLIP) -> None:
        self.tokenizer = image_tokenizer
        self.pipeline = pipeline
        self.settings = settings
        want = int(pipeline.image_normalizer.mean.shape[-1])
        if image_tokenizer.embed_dim != want:
            raise MioUserError(f"the SEED decoder head gives {image_tokenizer.embed_dim}-d image embeddings, the unCLIP "
                             f"pipeline expects {want}-d ones: they do not belong together")

    def embeddings(self, codes: np.ndarray) -> torch.Tensor:
        """(F, 32) codes -> (F, D) unCLIP image embeddings."""
        return self.tokenizer.decode_embeddings(np.asarray(codes, dtype=np.int64))

    def decode(self, codes: np.ndarray) -> list[PILImage.Image]:
        """(F, 32) codes -> F images, each drawn with the same seed."""
        embeds = self.embeddings(codes)  # (F, D)
        unet = self.pipeline.unet
        s = self.settings
        images = []
        for row in embeds:
            generator = torch.Generator(device=unet.device).manual_seed(s.seed)
            out = self.pipeline(image_embeds=row[None].to(unet.device, unet.dtype), prompt="",
                                num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                                noise_level=s.noise_level, generator=generator)
            images.append(out.images[0])
        return images


class SpeechDecoder:
    """Speech codes -> waveform through the SpeechTokenizer decoder."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.sample_rate = int(codec.sample_rate)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(L, T) codes -> (T * hop,) float32 waveform at ``sample_rate``."""
        return self.codec.decode(np.asarray(codes, dtype=np.int64))


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    sf.write(str(path), np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")


def write_gif(path: Path, frames: Sequence[PILImage.Image], frame_ms: int = 500) -> None:
    """Frames -> an endlessly looping animated GIF."""
    if not frames:
        raise MioUserError(f"{path}: a video needs at least one frame")
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=frame_ms, loop=0)
