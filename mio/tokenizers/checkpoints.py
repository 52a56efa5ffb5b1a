"""Loading the released SEED files into `SeedQuantizer`, strictly.

The reference builds `Blip2QformerQuantizer`, loads `eva_vit_g.pth` into its ViT and then
`seed_quantizer.pt` into the whole model, both with `strict=False`.  We load the same two files
in the same order (keys of the second override the first), but:

* a key our module needs that neither file holds is an error listing every such key, so no part
  of the module is ever left at its initialisation;
* keys the reference's module drops or never runs are accepted silently (`IGNORED_KEY_PATTERNS`);
* any other unexpected key is reported (a warning naming each one), and a shape mismatch is an
  error.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mio.tokenizers.seed import SeedConfig, SeedQuantizer
from mio.tokenizers.spec import resolve_checkpoints
from mio.userio import MioUserError

# Keys a released file may hold that the reference ignores. Derived from the reference module
# definitions (MIO-Team/MIO image_tokenizer/models/seed_qformer/qformer_quantizer.py and
# blip2.py, eva_vit.py):
IGNORED_KEY_PATTERNS: tuple[str, ...] = (
    # training-only: reconstruction of Q-Former features (`recon_s`), never run when tokenizing
    r"^blocks\.\d+\.",
    r"^pos_embed$",
    # the Q-Former's text branch, set to None by the reference (word/position embeddings, the
    # LM head `cls`, every layer's text feed-forward `intermediate`/`output`)
    r"^Qformer\.cls\.",
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
    r"^Qformer\.bert\.embeddings\.position_ids$",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^Qformer\.bert\.pooler\.",
    # eva_vit_g.pth: anything of EVA-CLIP the 39-block BLIP-2 ViT has no module for
    r"^visual_encoder\.(norm|fc_norm|head|lm_head|rel_pos_bias)\.",
    r"^visual_encoder\.blocks\.(39|[4-9]\d)\.",
)

_IGNORED = re.compile("|".join(IGNORED_KEY_PATTERNS))


@dataclass
class LoadReport:
    loaded: int
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def seed_checkpoint_files(spec: dict[str, Any], where: str) -> dict[str, Path]:
    return resolve_checkpoints(
        spec,
        {
            "quantizer": "seed_quantizer.pt from seed-tokenizer-2/ (SEED's quantizer and decoder head)",
            "vit": "eva_vit_g.pth from seed-tokenizer-2/ (BLIP-2's EVA ViT-g weights)",
        },
        where,
    )


def load_seed_checkpoint(cfg: SeedConfig, spec: dict[str, Any], where: str) -> SeedQuantizer:
    """Build SEED on the meta device and load the two released files into it, strictly."""
    files = seed_checkpoint_files(spec, where)
    with torch.device("meta"):
        model = SeedQuantizer(cfg)
    state = {f"visual_encoder.{k}": v for k, v in read_state_dict(files["vit"]).items()}
    state.update(read_state_dict(files["quantizer"]))  # the reference loads it second
    missing = sorted(k for k in model.state_dict() if k not in state)
    if missing:
        from_vit = [k for k in missing if k.startswith("visual_encoder.")]
        from_quantizer = [k for k in missing if not k.startswith("visual_encoder.")]
        lines = [f"  {files['vit']} lacks {len(from_vit)}: {[k.removeprefix('visual_encoder.') for k in from_vit]}"
                 if from_vit else "",
                 f"  {files['quantizer']} lacks {len(from_quantizer)}: {from_quantizer}" if from_quantizer else ""]
        raise MioUserError(
            f"tokenizer spec {where}: {len(missing)} key(s) the SEED module needs are in neither file, "
            f"it would keep random weights there:\n" + "\n".join(line for line in lines if line)
        )
    report = load_into(model, state, sources=f"{files['vit']} + {files['quantizer']}")
    if report.unexpected:
        warnings.warn(
            f"SEED checkpoint {files['quantizer']} / {files['vit']}: {len(report.unexpected)} key(s) "
            f"neither used nor known to be ignored by the reference, left unused: {report.unexpected}",
            stacklevel=2,
        )
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a `.pt`/`.pth` (weights_only) or `.safetensors` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise MioUserError(f"checkpoint {path} cannot be read as a state dict: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MioUserError(f"checkpoint {path} is not a flat state dict of tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], sources: str) -> LoadReport:
    """Load `state` into `model` (possibly on the meta device) or raise naming what is wrong."""
    needed = model.state_dict()
    missing = sorted(k for k in needed if k not in state)
    if missing:
        raise MioUserError(
            f"{sources}: {len(missing)} key(s) the model needs are missing, the module would keep "
            f"random weights there: {missing}"
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in needed.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise MioUserError(f"{sources}: {len(wrong)} shape mismatch(es): {wrong}")
    extra = sorted(k for k in state if k not in needed)
    ignored = [k for k in extra if _IGNORED.search(k)]
    unexpected = [k for k in extra if not _IGNORED.search(k)]
    model.load_state_dict({k: state[k] for k in needed}, strict=True, assign=True)
    return LoadReport(loaded=len(needed), ignored=ignored, unexpected=unexpected)
