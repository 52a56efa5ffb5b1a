"""`mio`: demo | prepare | inspect | tokenize | fit | generate | eval | export | bench | plan.

`mio fit` hands its arguments to LightningCLI (stage YAML files with class_path/init_args,
`--print_config`, command-line overrides); `generate` and `export` have their own parsers;
the other commands are plain argparse here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

BENCHES = ("tokenizers", "packing", "data", "train", "generate", "prepare")


def _log(msg: str) -> None:
    print(f"[mio] {msg}", file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from mio.demo import run_demo

    report = run_demo(args.out)
    summary = json.loads((report.parent / "summary.json").read_text())
    keys = ("caption_to_image_exact", "image_to_caption_exact", "asr_exact", "packing_efficiency", "final_loss", "val_loss",
            "seconds")
    _log(json.dumps({k: summary[k] for k in keys}))
    print(report)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mio.data.prepare import PrepareInterrupted, prepare

    try:
        m = prepare(args.recipe, args.out, tokenizer_dir=args.tokenizers, progress=_log, overwrite=args.overwrite)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not a traceback
        _log(str(e) if isinstance(e, PrepareInterrupted) else "interrupted; run the same command to resume")
        return 130
    _log(f"{m['samples']} samples in {len(m['shards'])} shards; skipped {m['skipped'] or 'none'}")
    if m.get("merged") is False:
        _log("this rank is done; the last rank to finish writes the merged manifest")
        return 0
    print(Path(args.out) / "manifest.json")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mio.data.inspect import inspect_dataset

    print(inspect_dataset(args.dir, args.samples, args.backbone, verify=args.verify))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from mio.tokenizers import tokenize_cli

    for row in tokenize_cli(args.spec, args.files):
        print(json.dumps(row), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"mio.bench.{args.part}")
    result = getattr(module, f"bench_{args.part}")()
    print(json.dumps(result))
    return 0


def cmd_fit(argv: list[str]) -> int:
    from mio.train.cli import main as fit_main

    return fit_main(argv)


def cmd_generate(argv: list[str]) -> int:
    from mio.generate.cli import generate_main

    return generate_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from mio.eval.cli import eval_main

    return eval_main(argv)


def cmd_export(argv: list[str]) -> int:
    from mio.export import export_main

    return export_main(argv)


def cmd_plan(argv: list[str]) -> int:
    from mio.plan import plan_main

    return plan_main(argv)


# Commands that parse their own arguments (LightningCLI, or a parser beside their code).
PASS_THROUGH: dict[str, Callable[[list[str]], int]] = {"fit": cmd_fit, "generate": cmd_generate, "export": cmd_export,
                                                     "eval": cmd_eval, "plan": cmd_plan}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the whole path on the embedded tiny default")
    d.add_argument("--out", type=Path, default=None, help="run folder (default: a fresh temporary folder)")
    d.set_defaults(func=cmd_demo)
    pr = sub.add_parser("prepare", help="raw data -> shards of segments + manifest")
    pr.add_argument("recipe", type=Path)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--tokenizers", type=Path, default=None,
                    help="folder of tokenizer specs the recipe's names resolve in (default: beside the recipe)")
    pr.add_argument("--overwrite", action="store_true",
                    help="start the --out dataset afresh (its shards, records and manifest are removed first)")
    pr.set_defaults(func=cmd_prepare)
    ins = sub.add_parser("inspect", help="a prepared dataset's figures and a few rendered samples")
    ins.add_argument("dir", type=Path)
    ins.add_argument("--samples", type=int, default=3)
    ins.add_argument("--backbone", type=Path, default=None, help="render samples with this model's text tokenizer")
    ins.add_argument("--verify", action="store_true", help="check every shard against the manifest's checksums")
    ins.set_defaults(func=cmd_inspect)
    tk = sub.add_parser("tokenize", help="media -> codes, one JSON line per file")
    tk.add_argument("--spec", required=True)
    tk.add_argument("files", nargs="+")
    tk.set_defaults(func=cmd_tokenize)
    b = sub.add_parser("bench", help="a benchmark against its baseline; JSON on the last line")
    b.add_argument("part", choices=BENCHES)
    b.set_defaults(func=cmd_bench)
    sub.add_parser("fit", help="one training stage: mio fit --config stages/X.yaml (LightningCLI)", add_help=False)
    sub.add_parser("generate", help="interleaved any-to-any generation: mio generate --model DIR --prompt TEXT ...",
                   add_help=False)
    sub.add_parser("eval", help="score a model on prepared eval data: mio eval MODEL --data DIR --tasks ... --out DIR",
                   add_help=False)
    sub.add_parser("export", help="merge a LoRA adapter into a plain model: mio export --merge ...", add_help=False)
    sub.add_parser("plan", help="a stage's memory per GPU under DDP and FSDP2: mio plan --config stages/X.yaml "
                   "--gpus 8 32", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (FileNotFoundError, ValueError) as e:
        _log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
