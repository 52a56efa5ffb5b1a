"""The SEED image quantizer and decoder head (SEED-LLaMA's `Blip2QformerQuantizer`, as MIO uses it).

Image (B, 3, S, S) -> EVA ViT -> ln_vision -> causal Q-Former (32 queries) -> encode task layer
-> nearest codebook row: 32 codes per image.  Codes -> codebook rows -> decode task layer ->
positional embedding -> transformer blocks -> down projection -> one unCLIP image embedding.

Written by hand because neither transformers nor timm has these pieces with the reference's
parameter names and behaviour: transformers' Blip2QFormer has no causal mask over the queries and
names its weights differently, and timm is not a dependency.  Every parameter name below is the
reference checkpoint's (see `seed_keys.json`), so a state dict loads without any remapping.
Training-only parts of the reference (`blocks.*`, `pos_embed`, the Q-Former's text branch) are
left out: tokenizing never runs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mio.userio import MioUserError


@dataclass(frozen=True)
class EvaViTConfig:
    """EVA ViT-g/14 as BLIP-2 cuts it (39 of EVA-CLIP's 40 blocks, no final norm)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    ln_eps: float = 1e-6


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-base Q-Former with cross-attention to the image every `cross_attention_freq` layers."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    ln_eps: float = 1e-12


@dataclass(frozen=True)
class SeedConfig:
    vit: EvaViTConfig = field(default_factory=EvaViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    codebook_size: int = 8192
    codebook_dim: int = 32
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_mlp_ratio: float = 4.0
    down_dims: tuple[int, ...] = (256, 128, 32)
    image_features_dim: int = 1024

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SeedConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise MioUserError(f"unknown SEED model settings {sorted(unknown)}; known: {sorted(known)}")
        values = dict(raw)
        values["vit"] = _sub_config(EvaViTConfig, raw.get("vit", {}), "vit")
        values["qformer"] = _sub_config(QFormerConfig, raw.get("qformer", {}), "qformer")
        if "down_dims" in values:
            values["down_dims"] = tuple(values["down_dims"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sub_config(kind: type, raw: dict[str, Any], name: str) -> Any:
    known = {f for f in kind.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise MioUserError(f"unknown SEED {name} settings {sorted(unknown)}; known: {sorted(known)}")
    return kind(**raw)


# ----------------------------------------------------------------------------- EVA ViT


class EvaAttention(nn.Module):
    """EVA attention: q and v have biases, k has none (the reference concatenates a zero bias)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3W)
        q, k, v = _split_heads(qkv, 3, self.heads)  # each (B, H, N, W/H)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(_merge_heads(out))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = EvaAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, P, W)
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaViT(nn.Module):
    """Keys as in `eva_vit_g.pth`: cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*."""

    def __init__(self, cfg: EvaViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise MioUserError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.image_size = cfg.image_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 1 + P, W)
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class Fp32LayerNorm(nn.LayerNorm):
    """The reference's `ln_vision`: normalises in float32 even when the model runs in float16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


# ----------------------------------------------------------------------------- Q-Former


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        q = _split_heads(self.query(x), 1, self.heads)[0]  # (B, H, Q, D)
        k = _split_heads(self.key(context), 1, self.heads)[0]  # (B, H, K, D)
        v = _split_heads(self.value(context), 1, self.heads)[0]
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))  # (B, Q, hidden)


class BertSelfOutput(nn.Module):
    """Post-LN residual: LayerNorm(dense(h) + input)."""

    def __init__(self, hidden_in: int, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_in, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg.hidden, cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        return self.output(self.self(x, context, causal), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Query branch of a Q-Former layer: causal self-attention, maybe cross-attention, query FFN."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, index: int) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden)
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = BertAttention(cfg, encoder_width)
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertSelfOutput(cfg.intermediate, cfg)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # queries (B, Q, hidden); image (B, 1 + P, W_vit)
        h = self.attention(queries, queries, causal=True)  # query i sees queries 0..i
        if self.has_cross_attention:
            h = self.crossattention(h, image, causal=False)
        return self.output_query(self.intermediate_query(h), h)


class BertEmbeddings(nn.Module):
    """Only the LayerNorm survives: the reference drops word and position embeddings."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)


class BertEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, encoder_width, i) for i in range(cfg.layers))


class BertModel(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, encoder_width)

    def forward(self, query_embeds: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.embeddings.LayerNorm(query_embeds)  # (B, Q, hidden)
        for layer in self.encoder.layer:
            h = layer(h, image)
        return h


class QFormer(nn.Module):
    """Named like the reference's `BertLMHeadModel` so keys read `Qformer.bert.*`."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int) -> None:
        super().__init__()
        self.bert = BertModel(cfg, encoder_width)


# ----------------------------------------------------------------------------- quantizer + decoder head


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an (n_codes, dim) codebook (squared Euclidean, no normalisation)."""

    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:  # (B, Q, dim) -> (B, Q) int64
        book = self.embedding.weight  # (n_codes, dim)
        flat = z.reshape(-1, z.shape[-1])  # (B*Q, dim)
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()  # (B*Q, n_codes)
        return dist.argmin(dim=1).reshape(z.shape[:-1])


class ViTBlock(nn.Module):
    """The decoder head's block (BLIP's `vit.Block`): fused qkv with bias, pre-LN."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W)
        q, k, v = _split_heads(self.qkv(x), 3, self.heads)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class SeedQuantizer(nn.Module):
    """The parts of SEED's `Blip2QformerQuantizer` that tokenizing and de-tokenizing run."""

    def __init__(self, cfg: SeedConfig) -> None:
        super().__init__()
        self.config = cfg
        hidden, n_query = cfg.qformer.hidden, cfg.qformer.num_query_tokens
        self.visual_encoder = EvaViT(cfg.vit)
        self.ln_vision = Fp32LayerNorm(cfg.vit.width)
        self.Qformer = QFormer(cfg.qformer, cfg.vit.width)
        self.query_tokens = nn.Parameter(torch.zeros(1, n_query, hidden))
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, cfg.codebook_dim)
        )
        self.decode_task_layer = nn.Sequential(
            nn.Linear(cfg.codebook_dim, cfg.codebook_dim), nn.Tanh(), nn.Linear(cfg.codebook_dim, hidden)
        )
        self.pos_embed_image = nn.Parameter(torch.zeros(1, n_query, hidden))
        self.blocks_image = nn.ModuleList(
            ViTBlock(hidden, cfg.decoder_heads, cfg.decoder_mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.image_down = _down_projection(hidden, cfg.down_dims)
        self.distill_image_proj = nn.Linear(n_query * cfg.down_dims[-1], cfg.image_features_dim)

    def query_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, Q, codebook_dim) pre-quantization vectors."""
        return self.query_features_from_vit(self.visual_encoder(images))

    def query_features_from_vit(self, vit_out: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, W_vit) ViT output -> (B, Q, codebook_dim): everything after the ViT."""
        image_embeds = self.ln_vision(vit_out)
        queries = self.query_tokens.expand(vit_out.shape[0], -1, -1).to(image_embeds.dtype)
        hidden = self.Qformer.bert(queries, image_embeds)  # (B, Q, hidden)
        return self.encode_task_layer(hidden)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, Q) int64 codes."""
        return self.quantize.nearest(self.query_features(images))

    def decode_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, Q) codes -> (B, image_features_dim) unCLIP image embedding."""
        h = self.decode_task_layer(self.quantize.embedding(codes)) + self.pos_embed_image  # (B, Q, hidden)
        for block in self.blocks_image:
            h = block(h)
        down = self.image_down(h)  # (B, Q, down_dims[-1])
        return self.distill_image_proj(down.reshape(down.shape[0], -1))


def _down_projection(hidden: int, dims: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = hidden
    for i, d in enumerate(dims):
        layers.append(nn.Linear(width, d, bias=False))
        if i < len(dims) - 1:
            layers.append(nn.ReLU())
        width = d
    return nn.Sequential(*layers)


def _split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts*W) -> `parts` tensors of (B, heads, N, W/heads)."""
    b, n, _ = x.shape
    x = x.reshape(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4)
    return tuple(x.unbind(0))


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
