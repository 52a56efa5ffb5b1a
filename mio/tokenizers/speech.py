"""SpeechCodec: waveforms <-> SpeechTokenizer RVQ codes (16 kHz mono, 50 frames/s, 1024 codes a layer).

MIO uses the first 4 RVQ layers: layer 0 carries content (speech input uses it alone), layers
1-3 timbre (speech output uses all 4).  The model is the `speechtokenizer` package's own
`SpeechTokenizer` class: the real one from `SpeechTokenizer.load_from_checkpoint(config, ckpt)`,
a tiny one from a small config with random weights drawn from the spec's `seed`.  A fresh
SpeechTokenizer has all-zero codebooks until a training forward runs k-means (it would emit code 0
everywhere), so a tiny one gets its codebooks filled from its own encoder's outputs on seeded
synthetic audio, layer by layer on the RVQ residuals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from speechtokenizer import SpeechTokenizer
from torch import nn

from mio.media import read_audio
from mio.tokenizers.spec import resolve_checkpoints, resolve_device, seeded_generator
from mio.userio import MioUserError

# The package's constructor reads these keys; a tiny spec must give them all.
MODEL_KEYS = (
    "n_filters", "strides", "dimension", "semantic_dimension", "bidirectional", "dilation_base",
    "residual_kernel_size", "n_residual_layers", "lstm_layers", "activation", "codebook_size", "n_q",
    "sample_rate",
)


class SpeechCodec:
    """Batched SpeechTokenizer encoding/decoding with MIO's conventions."""

    def __init__(
        self,
        model: SpeechTokenizer,
        config: dict[str, Any],
        *,
        num_layers: int = 4,
        max_seconds: float | None = 15.0,
        batch_size: int = 8,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.eval().to(self.device)
        self.sample_rate = int(config["sample_rate"])
        self.codebook_size = int(config["codebook_size"])
        self.hop_length = int(np.prod(config["strides"]))  # samples per frame (320)
        self.frame_rate = self.sample_rate // self.hop_length
        if not 1 <= num_layers <= int(config["n_q"]):
            raise MioUserError(f"num_layers must be in [1, {config['n_q']}], got {num_layers}")
        self.num_layers = int(num_layers)
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spec(cls, spec: dict[str, Any], where: str = "<dict>") -> "SpeechCodec":
        device = resolve_device(spec.get("device"))
        if "seed" in spec:
            config = dict(spec.get("model") or {})
            missing = [k for k in MODEL_KEYS if k not in config]
            if missing:
                raise MioUserError(f"tokenizer spec {where}: `model` lacks {missing}")
            model = random_speech_tokenizer(config, int(spec["seed"]))
        else:
            files = resolve_checkpoints(
                spec,
                {
                    "config": "SpeechTokenizer's config.json",
                    "checkpoint": "SpeechTokenizer.pt, the released SpeechTokenizer weights",
                },
                where,
            )
            config, model = load_speech_checkpoint(files["config"], files["checkpoint"])
        return cls(
            model,
            config,
            num_layers=spec.get("num_layers", 4),
            max_seconds=spec.get("max_seconds", 15.0),
            batch_size=spec.get("batch_size", 8),
            device=device,
        )

    # ------------------------------------------------------------------ audio

    def load_audio(self, path: str | os.PathLike) -> np.ndarray:
        """Read an audio file -> (T,) float32 mono at `sample_rate` (mio.media: channels averaged,
        resampled, truncated files refused)."""
        return read_audio(Path(path), str(path), self.sample_rate)

    def refusal(self, wave: np.ndarray, limit_length: bool = True) -> str | None:
        """Why a clip may not be used for pretraining (None if it may): empty or over max_seconds
        (``limit_length=False``: any length, as for a prompt)."""
        if wave.size == 0:
            return "the clip is empty (0 samples)"
        seconds = wave.shape[-1] / self.sample_rate
        if limit_length and self.max_seconds is not None and seconds > self.max_seconds:
            return (
                f"the clip lasts {seconds:.2f} s, over the {self.max_seconds:g} s limit "
                f"(MIO drops longer speech from pretraining)"
            )
        return None

    # ------------------------------------------------------------------ encode / decode

    def encode(self, waves: Sequence[np.ndarray], names: Sequence[str] | None = None,
               limit_length: bool = True) -> list[np.ndarray]:
        """Mono waveforms at `sample_rate` -> per clip (num_layers, frames) int64 codes; clips over
        `max_seconds` are refused unless ``limit_length`` is False (generation's prompts).

        Each clip is zero-padded to whole frames (frames = ceil(T / hop)). Clips are batched
        only with clips of the same padded length: the encoder's bidirectional LSTM would
        otherwise see another clip's padding, and a clip's codes would depend on its batch.
        """
        names = list(names) if names is not None else [f"clip {i}" for i in range(len(waves))]
        padded = [self._checked_padded(w, name, limit_length) for w, name in zip(waves, names)]
        codes: list[np.ndarray | None] = [None] * len(padded)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(padded):
            by_length.setdefault(w.shape[0], []).append(i)
        with torch.inference_mode():
            for idx in by_length.values():
                for start in range(0, len(idx), self.batch_size):
                    group = idx[start : start + self.batch_size]
                    x = torch.from_numpy(np.stack([padded[i] for i in group]))[:, None, :]  # (B, 1, T)
                    out = self.model.encode(x.to(self.device), n_q=self.num_layers)  # (L, B, frames)
                    for j, i in enumerate(group):
                        codes[i] = out[:, j, :].cpu().numpy().astype(np.int64)
        return codes  # type: ignore[return-value]

    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """(L <= num_layers, frames) codes of one clip -> (frames * hop,) float32 waveform."""
        c = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        if c.ndim != 2 or not 1 <= c.shape[0] <= self.num_layers or c.shape[1] == 0:
            raise MioUserError(
                f"speech codes must have shape (L, frames) with 1 <= L <= {self.num_layers} and "
                f"frames >= 1, got {tuple(c.shape)}"
            )
        bad = (c < 0) | (c >= self.codebook_size)
        if bad.any():
            layer, frame = (int(v) for v in bad.nonzero()[0])
            raise MioUserError(
                f"speech code {int(c[layer, frame])} (layer {layer}, frame {frame}) is outside the "
                f"codebook [0, {self.codebook_size})"
            )
        with torch.inference_mode():
            wave = self.model.decode(c[:, None, :].to(self.device))  # (1, 1, frames * hop)
        return wave[0, 0].float().cpu().numpy()

    def _checked_padded(self, wave: np.ndarray, name: str, limit_length: bool) -> np.ndarray:
        w = np.asarray(wave, dtype=np.float32)
        if w.ndim != 1:
            raise MioUserError(f"{name}: expected a mono (T,) waveform, got shape {w.shape}")
        reason = self.refusal(w, limit_length)
        if reason:
            raise MioUserError(f"{name}: {reason}")
        if not np.isfinite(w).all():
            raise MioUserError(f"{name}: the waveform holds NaN or infinite samples")
        frames = math.ceil(w.shape[0] / self.hop_length)
        return np.pad(w, (0, frames * self.hop_length - w.shape[0]))


def load_speech_checkpoint(config_path: Path, ckpt_path: Path) -> tuple[dict[str, Any], SpeechTokenizer]:
    """The package's own loader (plain state dict; torch.load defaults to weights_only=True)."""
    try:
        config = json.loads(Path(config_path).read_text())
    except json.JSONDecodeError as err:
        raise MioUserError(f"SpeechTokenizer config {config_path} is not valid JSON: {err}") from err
    missing = [k for k in MODEL_KEYS if k not in config]
    if missing:
        raise MioUserError(f"SpeechTokenizer config {config_path} lacks {missing}")
    try:
        with _quiet_weight_norm():
            model = SpeechTokenizer.load_from_checkpoint(str(config_path), str(ckpt_path))
    except RuntimeError as err:  # load_state_dict's missing/unexpected/shape report
        raise MioUserError(f"SpeechTokenizer checkpoint {ckpt_path} does not fit {config_path}: {err}") from err
    return config, model


# ---------------------------------------------------------------------- tiny random tokenizers


def random_speech_tokenizer(config: dict[str, Any], seed: int) -> SpeechTokenizer:
    """The package's SpeechTokenizer with random weights from `seed` and filled codebooks.

    The package's default init shrinks the signal at every convolution (uniform weights of
    variance 1/(3 fan_in)) while the biases add a constant, so its encoder outputs barely move
    with the input; convolutions get N(0, 1/fan_in) weights and zero biases instead.
    """
    model = random_speech_weights(config, seed)
    fill_codebooks_from_features(model, seed)
    return model


def random_speech_weights(config: dict[str, Any], seed: int) -> SpeechTokenizer:
    """Random weights drawn from `seed`; the codebooks stay empty (zeros, not yet initialised)."""
    with torch.random.fork_rng(devices=[]), _quiet_weight_norm():
        torch.manual_seed(seed)
        model = SpeechTokenizer(config).eval()
        for module in model.modules():
            if hasattr(module, "weight_v"):  # the package's weight-normed Conv1d / ConvTranspose1d
                _variance_preserving_(module)
    return model


def _variance_preserving_(conv: nn.Module) -> None:
    v = conv.weight_v  # Conv1d: (out, in, k); ConvTranspose1d: (in, out, k)
    fan_in = v.shape[1] * v.shape[2] if isinstance(conv, nn.Conv1d) else v.shape[0] * v.shape[2]
    with torch.no_grad():
        v.normal_(0.0, 1.0 / math.sqrt(fan_in))
        conv.weight_g.copy_(v.norm(dim=tuple(range(1, v.ndim)), keepdim=True))  # weight == v
        if conv.bias is not None:
            conv.bias.zero_()


@contextlib.contextmanager
def _quiet_weight_norm() -> Iterator[None]:
    """The package builds its convolutions with the deprecated torch.nn.utils.weight_norm."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        yield


def fill_codebooks_from_features(model: SpeechTokenizer, seed: int, seconds: float = 24.0) -> None:
    """Fill every RVQ codebook with encoder outputs of seeded synthetic audio.

    Layer k's rows are residual vectors (after layers 0..k-1) of randomly drawn frames, the way
    k-means initialisation starts; that keeps the codes from collapsing. A frame that became a
    row would leave a zero residual, which unseen audio never does, so each frame is quantized
    for the next layer with its own row left out.
    """
    gen = seeded_generator(seed + 1)
    clips = synthetic_speechlike(8, int(seconds * model.sample_rate / 8), model.sample_rate, gen)
    with torch.inference_mode():
        encoded = model.encoder(clips[:, None, :])  # (B, D, frames)
    residual = encoded.permute(0, 2, 1).reshape(-1, encoded.shape[1]).clone()  # (N, D)
    layers = model.quantizer.vq.layers
    size = layers[0].codebook_size
    if residual.shape[0] < size:
        raise MioUserError(f"{residual.shape[0]} frames cannot fill a codebook of {size}; lengthen the audio")
    with torch.no_grad():
        for layer in layers:
            candidates = torch.unique(residual, dim=0)  # sorted: deterministic, no duplicate rows
            if candidates.shape[0] < size:
                raise MioUserError(f"{candidates.shape[0]} distinct frames cannot fill a codebook of {size}")
            rows = candidates[torch.randperm(candidates.shape[0], generator=gen)[:size]]  # (size, D)
            # Through the layer's state-dict keys: the names SpeechTokenizer's released checkpoints use.
            layer.load_state_dict({"_codebook.embed": rows, "_codebook.embed_avg": rows,
                                   "_codebook.cluster_size": torch.ones(size), "_codebook.inited": torch.ones(1)})
            dist = torch.cdist(residual, rows, compute_mode="donot_use_mm_for_euclid_dist")  # (N, size)
            dist[dist == 0] = float("inf")  # leave each frame's own row out
            residual = residual - rows[dist.argmin(dim=1)]


def synthetic_speechlike(n: int, length: int, sample_rate: int, gen: torch.Generator) -> torch.Tensor:
    """n clips (n, length): voiced harmonic stretches with gliding pitch, noise bursts and pauses."""
    t = torch.arange(length) / sample_rate
    out = torch.zeros(n, length)
    segment = sample_rate // 5  # 200 ms
    for i in range(n):
        for start in range(0, length, segment):
            end = min(start + segment, length)
            kind = int(torch.randint(3, (1,), generator=gen))
            tt = t[start:end]
            if kind == 0:  # voiced: harmonics of a gliding f0
                f0 = 90 + 200 * torch.rand(1, generator=gen) + 40 * torch.rand(1, generator=gen) * tt / tt[-1]
                phase = 2 * math.pi * torch.cumsum(f0.expand_as(tt), 0) / sample_rate
                amps = torch.rand(6, generator=gen) / torch.arange(1, 7)
                seg = sum(a * torch.sin((h + 1) * phase) for h, a in enumerate(amps))
            elif kind == 1:  # fricative-like noise
                seg = 0.3 * torch.rand(1, generator=gen) * torch.randn(end - start, generator=gen)
            else:  # near silence
                seg = 0.01 * torch.randn(end - start, generator=gen)
            out[i, start:end] = seg * torch.hann_window(end - start, periodic=False)
    return out / out.abs().amax(dim=1, keepdim=True).clamp_min(1e-6) * 0.5
