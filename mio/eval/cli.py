"""`mio eval`: score a model folder on prepared eval data with the paper's metrics.

    mio eval runs/sft/model --data data/coco_val data/librispeech_test --tasks image_captioning,asr --out eval/
    mio eval runs/sft/model --data data/tts_test --tasks tts --asr-model whisper-large-v3 --out eval/tts

Tasks and their metrics: image_captioning, video_understanding (CIDEr, BLEU-4); image_qa, vqa
(VQAv2 accuracy); asr (WER); tts (WER of --asr-model's transcript); image_generation,
descriptive_image_generation (CLIP score with --clip-model); every task also exact match.
Writes generations.jsonl, metrics.json and report.html into --out; the metrics JSON is the
last line of standard output. Under torchrun (or srun) the ranks share the items, each on its own
GPU, and rank 0 writes the files one process would:

    torchrun --nproc_per_node 8 -m mio.cli eval runs/sft/model --data data/coco_val --tasks image_captioning --out eval/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mio.generate.settings import overrides_from_strings
from mio.userio import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="model folder (ours, or MIO's release layout with --tokenizers)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="prepared eval dataset folder(s) (mio prepare)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. image_captioning,asr")
    p.add_argument("--out", type=Path, required=True, help="folder for generations.jsonl, metrics.json, report.html")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="MODALITY.FIELD=VALUE",
                   help="override a Table 8 decoding setting, as in mio generate (e.g. all.num_beams=1)")
    p.add_argument("--asr-model", default=None, help="local transformers speech recognition folder (TTS WER)")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (CLIP score of generated images)")
    p.add_argument("--tokenizers", type=Path, default=None, help="tokenizer specs / MIO checkpoint tree, as in mio generate")
    p.add_argument("--unclip", type=Path, default=None, help="a StableUnCLIPImg2ImgPipeline folder for decoding images")
    p.add_argument("--steps", type=int, default=20, help="unCLIP denoising steps (images decoded for the CLIP score)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    return p


def eval_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from mio.eval.run import EvalSettings, evaluate
    from mio.generate.detok import UnclipSettings
    from mio.generate.generator import Generator
    from mio.generate.spread import Spread

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = EvalSettings(tasks=tasks, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            seed=args.seed, decode=overrides_from_strings(args.overrides), limit=args.limit,
                            asr_model=args.asr_model, clip_model=args.clip_model, device=args.device,
                            unclip=UnclipSettings(steps=args.steps, seed=args.seed))
    for folder in args.data:
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {folder} is not a folder (a prepared dataset from mio prepare)")
    spread = Spread.from_env()
    try:
        generator = Generator(args.model, args.tokenizers, unclip=args.unclip, device=spread.device(args.device))
        generator.media.local_rank = spread.ranks.local_rank  # its tokenizers on this rank's GPU
        done = evaluate(generator, args.data, settings, args.out, spread=spread)
    finally:
        spread.close()
    if done is not None:  # rank 0 (or the only process)
        print(json.dumps(done[0]))
    return 0


if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
