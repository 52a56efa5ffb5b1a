"""`mio export --merge ADAPTER --out DIR`: a LoRA adapter folder -> a merged plain model folder.

The merged folder is what every stage writes (``save_pretrained`` model, tokenizer, generation
config, mio's vocabulary table and tokenizer specs), so vanilla transformers and `mio generate`
load it. Before writing, the merged model's logits are checked against the adapter's on a probe
of text and added-token ids.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mio.dtypes import DTYPES, dtype_named, recorded_dtype
from mio.log import info
from mio.model.backbone import load_backbone, load_tokenizer_specs, save_model_folder
from mio.model.lora import ADAPTER_CONFIG, is_adapter_folder
from mio.userio import MioUserError, run_command
from mio.vocab import VocabTable, folder_table

# Largest |merged - adapter| logit difference accepted, relative to the largest |logit|: merging
# reorders float sums (W + s*B@A instead of x@W + s*(x@A)@B), nothing more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
STAGE_CONFIG = "mio_stage_config.yaml"


def adapter_base(adapter: Path) -> Path:
    """The base model folder an adapter's config names."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise MioUserError(f"{adapter / ADAPTER_CONFIG} names no base model; pass --base")
    return Path(base)


def probe_ids(tokenizer: Any, table: VocabTable) -> torch.Tensor:
    """(1, T) ids touching text rows and the added rows LoRA runs train."""
    text = tokenizer("a probe of the merge", add_special_tokens=False)["input_ids"][:6]
    added = [table.image_begin, table.image_start, table.image_end_id - 1, table.image_end,
             table.speech_begin, table.speech_start, table.speech_end_id - 1, table.speech_end]
    return torch.tensor([text + added])


def merge_adapter(adapter: str | Path, out: str | Path, base: str | Path | None = None,
                  dtype: str = "auto") -> Path:
    """Load ``base`` (default: the adapter's recorded base), apply the adapter, merge it and
    write a plain model folder to ``out``; returns ``out``."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not is_adapter_folder(adapter):
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    base = Path(base) if base is not None else adapter_base(adapter)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: the adapter's base model folder is missing (no config.json); pass --base")
    torch_dtype = recorded_dtype(base) if dtype == "auto" else dtype_named(dtype, "--dtype")
    model, tokenizer, table = load_backbone(base, dtype=torch_dtype)
    if (adapter / "tokenizer_config.json").is_file():  # a LoRA stage saves its tokenizer and table beside the adapter
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)
        table = folder_table(adapter, tokenizer)
    specs = load_tokenizer_specs(adapter) or load_tokenizer_specs(base)

    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    ids = probe_ids(tokenizer, table)
    with torch.no_grad():
        expected = peft_model(ids).logits.float()  # (1, T, V)
        merged = peft_model.merge_and_unload().eval()
        got = merged(ids).logits.float()
    scale = expected.abs().max().clamp(min=1.0)
    error = ((got - expected).abs().max() / scale).item()
    info(f"merged logits differ from the adapter's by {error:.2e} (relative, {torch_dtype})")
    if error > TOLERANCE[torch_dtype]:
        raise MioUserError(f"merging {adapter} into {base} changed the logits by {error:.2e} (relative), "
                         f"over the {TOLERANCE[torch_dtype]:.0e} a {torch_dtype} merge allows")
    out = save_model_folder(merged, tokenizer, table, out, tokenizer_specs=specs)
    if (adapter / STAGE_CONFIG).is_file():
        shutil.copyfile(adapter / STAGE_CONFIG, out / STAGE_CONFIG)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merge", type=Path, required=True, metavar="ADAPTER",
                   help="a PEFT adapter folder (what `mio fit` prints after a LoRA stage)")
    p.add_argument("--out", type=Path, required=True, help="the merged model folder to write")
    p.add_argument("--base", type=Path, default=None,
                   help="the base model folder (default: the adapter config's base_model_name_or_path)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype to load and merge in (default: the base model's)")
    return p


def export_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _print_merged(args))


def _print_merged(args: argparse.Namespace) -> int:
    print(merge_adapter(args.merge, args.out, base=args.base, dtype=args.dtype))
    return 0
