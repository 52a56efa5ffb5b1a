"""ImageTokenizer: images -> 32 SEED codes each, and codes -> unCLIP image embeddings.

Built from a spec (`tokenizers/seed.yaml`, `tokenizers/tiny/seed.yaml`): the real one loads the
released `seed_quantizer.pt` + `eva_vit_g.pth`; a tiny one has random weights drawn from its
`seed` and a codebook filled from its own encoder's outputs on seeded synthetic images, so that its
codes carry information about the image (a random codebook collapses onto a handful of codes).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mio.dtypes import tokenizer_dtype
from mio.media import read_image, to_rgb
from mio.tokenizers.checkpoints import load_seed_checkpoint
from mio.tokenizers.seed import SeedConfig, SeedQuantizer
from mio.tokenizers.spec import resolve_device, seeded_generator
from mio.userio import MioUserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

ImageInput = Image.Image | str | os.PathLike


class ImageTokenizer:
    """SEED image tokenizer. `encode` and `decode_embeddings` run batched under inference_mode."""

    def __init__(
        self,
        model: SeedQuantizer,
        *,
        interpolation: str = "bilinear",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        batch_size: int = 16,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise MioUserError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        cfg = model.config
        self.model = model.eval().to(device=device or torch.device("cpu"), dtype=dtype)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.codebook_size = cfg.codebook_size
        self.tokens_per_image = cfg.qformer.num_query_tokens
        self.embed_dim = cfg.image_features_dim
        self.image_size = cfg.vit.image_size
        self.interpolation = interpolation
        self.batch_size = int(batch_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spec(cls, spec: dict[str, Any], where: str = "<dict>") -> "ImageTokenizer":
        interpolation = spec.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:  # checked before building a large model
            raise MioUserError(f"tokenizer spec {where}: interpolation must be one of {sorted(INTERPOLATIONS)}")
        cfg = SeedConfig.from_dict(spec.get("model", {}))
        device = resolve_device(spec.get("device"))
        dtype = tokenizer_dtype(spec.get("dtype"), device)
        if "seed" in spec:
            model = random_seed_quantizer(cfg, int(spec["seed"]))
        else:
            model = load_seed_checkpoint(cfg, spec, where)
        return cls(
            model,
            interpolation=interpolation,
            mean=spec.get("mean", CLIP_MEAN),
            std=spec.get("std", CLIP_STD),
            batch_size=spec.get("batch_size", 16),
            device=device,
            dtype=dtype,
        )

    # ------------------------------------------------------------------ preprocessing

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image -> (3, S, S) float32: resize to S x S (no crop), scale to [0, 1], normalise."""
        pil = open_image(image)
        pil = pil.resize((self.image_size, self.image_size), INTERPOLATIONS[self.interpolation])
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return (pixels.float() / 255.0 - self._mean) / self._std

    # ------------------------------------------------------------------ encode / decode

    def encode(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images or image paths -> (N, tokens_per_image) int64 codes."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            raise TypeError("encode takes a sequence of images; wrap a single image in a list")
        out = np.zeros((len(images), self.tokens_per_image), dtype=np.int64)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(im) for im in chunk])  # (B, 3, S, S)
            out[start : start + len(chunk)] = self.encode_tensor(batch).cpu().numpy()
        return out

    def encode_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already normalised (B, 3, S, S) pixels -> (B, tokens_per_image) int64 codes."""
        with torch.inference_mode():
            return self.model.encode(pixels.to(self.device, self.dtype))

    def decode_embeddings(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, tokens_per_image) codes -> (N, embed_dim) float32 unCLIP image embeddings (CPU)."""
        codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        self.check_codes(codes_t)
        rows = []
        with torch.inference_mode():
            for start in range(0, codes_t.shape[0], self.batch_size):
                chunk = codes_t[start : start + self.batch_size].to(self.device)
                rows.append(self.model.decode_embeddings(chunk).float().cpu())
        if not rows:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(rows)

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise MioUserError(
                f"image codes must have shape (N, {self.tokens_per_image}), got {tuple(codes.shape)}"
            )
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise MioUserError(
                f"image code {int(codes[i, j])} (image {i}, position {j}) is outside the codebook "
                f"[0, {self.codebook_size})"
            )


def open_image(image: ImageInput) -> Image.Image:
    """A PIL image (taken as the caller's pixels) or a file (decoded by mio.media: upright by its
    EXIF orientation) -> RGB PIL image; missing or unreadable files name the file."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return read_image(Path(image), str(image))


# ---------------------------------------------------------------------- tiny random tokenizers


def random_seed_quantizer(cfg: SeedConfig, seed: int) -> SeedQuantizer:
    """A SEED quantizer with random weights, the same for the same `seed` and config, whose
    codebook is filled from its own pre-quantization vectors on seeded synthetic images."""
    model = random_weights_seed_quantizer(cfg, seed)
    fill_codebook_from_features(model, seed)
    return model.eval()


def random_weights_seed_quantizer(cfg: SeedConfig, seed: int) -> SeedQuantizer:
    """Random weights drawn from `seed` (codebook left as drawn).

    Linear and conv weights are N(0, 1/fan_in) (variance preserving), with the attention query
    and key projections 3x larger so that attention depends on the image content instead of
    averaging it away: with PyTorch's default init, differently drawn images of similar colours
    got the same 32 codes. The vectors the reference draws from N(0, 0.02) (query tokens, class
    token, positional embeddings) are drawn the same way, so the 32 queries differ.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SeedQuantizer(cfg)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                gain = 3.0 if name.endswith(("query", "key", "qkv")) else 1.0
                nn.init.normal_(module.weight, std=gain / math.sqrt(module.weight[0].numel()))
        for p in (model.query_tokens, model.visual_encoder.cls_token, model.visual_encoder.pos_embed,
                  model.pos_embed_image):
            nn.init.normal_(p, std=0.02)
    return model.eval()


def fill_codebook_from_features(model: SeedQuantizer, seed: int) -> None:
    """Set every codebook row to one pre-quantization vector of a seeded synthetic image.

    Like k-means' first step: the rows then sit where the encoder's outputs lie, so nearest
    neighbours separate images instead of all falling on the few rows nearest the origin.
    """
    cfg = model.config
    gen = seeded_generator(seed + 1)
    n_images = math.ceil(cfg.codebook_size / cfg.qformer.num_query_tokens)
    images = synthetic_images(n_images, cfg.vit.image_size, gen)  # (M, 3, S, S), normalised
    with torch.inference_mode():
        feats = torch.cat([model.query_features(images[i : i + 64]) for i in range(0, n_images, 64)])
    pool = feats.reshape(-1, cfg.codebook_dim)  # (M*Q, dim)
    rows = pool[torch.randperm(pool.shape[0], generator=gen)[: cfg.codebook_size]]
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(rows)


def synthetic_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n smooth, colourful images (random low-frequency fields at mixed scales), CLIP-normalised."""
    out = torch.empty(n, 3, size, size)
    scales = (2, 3, 4, 6, 8)
    for i in range(n):
        k = scales[int(torch.randint(len(scales), (1,), generator=gen))]
        coarse = torch.rand(1, 3, k, k, generator=gen)
        field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
        field = field + 0.05 * torch.randn(3, size, size, generator=gen)
        out[i] = field.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (out - mean) / std
