"""`mio`: turn a Hugging Face causal LM into an any-to-any model over discrete multimodal tokens.

`mio fit` hands its arguments to LightningCLI (stage YAML files with class_path/init_args,
`--print_config`, command-line overrides); `generate` and `export` have their own parsers;
the other commands are plain argparse here. `mio -v COMMAND ...` shows mio's debug messages and
the third-party messages that mio filters out (mio/noise.py); `mio -q COMMAND ...` shows only
warnings and errors (mio/log.py).

Exit status: 0 done; 1 done, but something failed (a file `tokenize` could not read, a shard
`inspect --verify` found changed, a model folder `inspect` found tokenizing otherwise than it
trained); 2 nothing done (bad input or configuration: the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from mio.bench import SECONDS as BENCH_SECONDS
from mio.log import info, set_verbosity
from mio.userio import run_command

VERBOSE = ("-v", "--verbose")
QUIET = ("-q", "--quiet")
VERBOSITY_HELP = {VERBOSE: "debug messages too, and every message of the dependencies",
                  QUIET: "warnings and errors only"}


def cmd_demo(args: argparse.Namespace) -> int:
    from mio.demo import run_demo

    report = run_demo(args.out)
    summary = json.loads((report.parent / "summary.json").read_text())
    keys = ("caption_to_image_exact", "caption_to_image_exact_guidance3", "image_to_caption_exact", "asr_exact",
            "packing_efficiency", "final_loss", "val_loss", "seconds")
    info(json.dumps({k: summary[k] for k in keys}))
    print(report)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mio.data.prepare import PrepareInterrupted, prepare

    try:
        m = prepare(args.recipe, args.out, tokenizer_dir=args.tokenizers, progress=info, overwrite=args.overwrite)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not a traceback
        info(str(e) if isinstance(e, PrepareInterrupted) else "interrupted; run the same command to resume")
        return 130
    info(f"{m['samples']} samples in {len(m['shards'])} shards; skipped {m['skipped'] or 'none'}")
    if m.get("merged") is False:
        info("this rank is done; the last rank to finish writes the merged manifest")
        return 0
    print(Path(args.out) / "manifest.json")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mio.data.inspect import inspect_dataset, verify_shards
    from mio.data.shards import read_manifest

    if (args.dir / "config.json").is_file():  # a model folder: does it tokenize as it trained?
        from mio.model.saved_tokenizer import folder_report

        lines, problems = folder_report(args.dir)
        print("\n".join(lines + [f"problem: {p}" for p in problems] + (["tokenizer: agrees"] if not problems else [])))
        return 1 if problems else 0
    print(inspect_dataset(args.dir, args.samples, args.backbone))
    if not args.verify:
        return 0
    problems = verify_shards(args.dir, read_manifest(args.dir))
    print("verify: all shards match the manifest" if not problems else "verify: " + "; ".join(problems))
    return 1 if problems else 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from mio.tokenizers import tokenize_cli

    failed = 0
    for row in tokenize_cli(args.spec, args.files):
        print(json.dumps(row), flush=True)
        failed += "error" in row
    if failed:
        info(f"{failed} of {len(args.files)} file(s) could not be tokenized (see their \"error\")")
    return 1 if failed else 0


def cmd_tiny_base(args: argparse.Namespace) -> int:
    from mio.demo import build_base

    print(build_base(args.data, args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mio.report import report_runs

    print(report_runs(args.runs, args.out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mio.bench import bench_function, sizes, what_it_measures

    kwargs = sizes(args.part, args.set)
    seconds = BENCH_SECONDS[args.part]
    took = f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {seconds} s"
    sized = " (at its default sizes; --set changed some)" if kwargs else ""
    info(f"bench {args.part}: {what_it_measures(args.part)}. It takes {took} on 2 CPU cores{sized}; "
         f"the figures are the JSON object on the last line")
    print(json.dumps(bench_function(args.part)(**kwargs)))
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


def cmd_serve(argv: list[str]) -> int:
    from mio.serve.cli import serve_main

    return serve_main(argv)


def cmd_plan(argv: list[str]) -> int:
    from mio.plan import plan_main

    return plan_main(argv)


# Commands that parse their own arguments (LightningCLI, or a parser beside their code).
PASS_THROUGH: dict[str, Callable[[list[str]], int]] = {"fit": cmd_fit, "generate": cmd_generate, "export": cmd_export,
                                                     "eval": cmd_eval, "plan": cmd_plan, "serve": cmd_serve}


def _mio_version() -> str:
    try:
        return version("mio")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mio {_mio_version()}")
    for flags, text in VERBOSITY_HELP.items():
        p.add_argument(*flags, action="store_true", help=text)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], summary: str,
                description: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{description}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, text in VERBOSITY_HELP.items():
            c.add_argument(*flags, action="store_true", help=text)
        c.set_defaults(func=func)
        return c

    d = command("demo", cmd_demo, "the whole path on the bundled tiny assets, with its report",
                "Prepares the bundled samples, builds a tiny base model, trains the four tiny stages and checks\n"
                "that the model reproduces its memorised pairs; writes DIR/report.html, DIR/summary.json and\n"
                "DIR/model (about 7 minutes on 2 CPU cores).")
    d.add_argument("--out", type=Path, default=None, help="run folder (default: a fresh temporary folder)")
    tk = command("tokenize", cmd_tokenize, "media -> codes, one JSON line per file",
                 "Shows what a modality tokenizer spec makes of your images, speech or videos. Exits 1 when a\n"
                 "file could not be tokenized (its line has an \"error\"), after trying every file.")
    tk.add_argument("--spec", required=True, help="a tokenizer spec, e.g. tokenizers/tiny/seed.yaml")
    tk.add_argument("files", nargs="+")
    pr = command("prepare", cmd_prepare, "raw data -> WebDataset shards of segments + manifest.json",
                 "Reads the rows a data recipe describes, tokenizes their media and writes shards. Ranks come\n"
                 "from torchrun/SLURM variables; a rerun skips finished shards.")
    pr.add_argument("recipe", type=Path)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--tokenizers", type=Path, default=None,
                    help="folder of tokenizer specs the recipe's names resolve in (default: beside the recipe)")
    pr.add_argument("--overwrite", action="store_true",
                    help="start the --out dataset afresh (its shards, records and manifest are removed first)")
    ins = command("inspect", cmd_inspect, "a prepared dataset's figures and a few rendered samples; or a model "
                  "folder's tokenizer check",
                  "Prints the manifest's figures, skips by reason and samples as stored and as trained.\n"
                  "With --verify, exits 1 when a shard is missing or differs from the manifest's checksum.\n"
                  "Given a model folder (a config.json), checks that its tokenizer, loaded by vanilla AutoTokenizer,\n"
                  "agrees with its mio_vocab.json and tokenizes as the stage that saved it trained; exits 1 if not.")
    ins.add_argument("dir", type=Path, help="a prepared dataset, or a model folder")
    ins.add_argument("--samples", type=int, default=3)
    ins.add_argument("--backbone", type=Path, default=None, help="render samples with this model's text tokenizer")
    ins.add_argument("--verify", action="store_true", help="check every shard against the manifest's checksums")
    tb = command("tiny-base", cmd_tiny_base, "a tiny random Llama to try the stages on",
                 "Trains a byte-level BPE tokenizer on the texts of the prepared datasets under DATA and saves it\n"
                 "with a tiny random Llama: the text-only base model stages/tiny/ start from. For a real run,\n"
                 "any local Hugging Face causal LM folder is the base model.")
    tb.add_argument("data", type=Path, help="a folder of prepared datasets, e.g. runs/tiny/data")
    tb.add_argument("--out", type=Path, required=True)
    rp = command("report", cmd_report, "an HTML report of training runs",
                 "Loss curves per stage and per modality, token shares, packing efficiency, learning rate and\n"
                 "throughput of one stage folder (a trainer.default_root_dir), or of a chain of them: several\n"
                 "folders, or a folder whose subfolders are stages (in name order).")
    rp.add_argument("runs", type=Path, nargs="+", help="stage folders, or a folder holding them")
    rp.add_argument("--out", type=Path, default=None, help="the HTML file (default: report.html in the first folder)")
    b = command("bench", cmd_bench, "a benchmark against its baseline, measured in one run",
                "Says what it measures and about how long it takes before it starts; prints one JSON object\n"
                "(the figure and its baseline) as the last line.")
    b.add_argument("part", choices=sorted(BENCH_SECONDS))
    b.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="change one of the bench's sizes (a keyword of mio.bench.PART.bench_PART)")
    # Parsed by their own code: `mio fit --help` and the others show their options.
    sub.add_parser("fit", help="one training stage: mio fit --config stages/X.yaml (LightningCLI)", add_help=False)
    sub.add_parser("generate", help="interleaved any-to-any generation: mio generate --model DIR --prompt TEXT ...",
                   add_help=False)
    sub.add_parser("eval", help="score a model on prepared eval data: mio eval MODEL --data DIR --tasks ... --out DIR",
                   add_help=False)
    sub.add_parser("export", help="merge a LoRA adapter into a plain model: mio export --merge ...", add_help=False)
    sub.add_parser("plan", help="a stage's memory per GPU under DDP and FSDP2: mio plan --config stages/X.yaml "
                   "--gpus 8 32", add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible server with a chat page: mio serve MODEL_DIR", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    before = []  # -v / -q before the command
    while argv and argv[0] in VERBOSE + QUIET:
        before.append(argv.pop(0))
    if argv and argv[0] in PASS_THROUGH:
        flags = before + [a for a in argv[1:] if a in VERBOSE + QUIET]
        _set_verbosity(any(a in VERBOSE for a in flags), any(a in QUIET for a in flags))
        return PASS_THROUGH[argv[0]]([a for a in argv[1:] if a not in VERBOSE + QUIET])
    args = build_parser().parse_args(argv)  # a subcommand's own -v / -q default would hide the ones before it
    _set_verbosity(args.verbose or any(a in VERBOSE for a in before), args.quiet or any(a in QUIET for a in before))
    func: Callable[[argparse.Namespace], int] = args.func
    return run_command(lambda: func(args))


def _set_verbosity(verbose: bool, quiet: bool) -> None:
    """mio's own level (mio/log.py); without -v, the dependencies' known noise filtered (mio/noise.py)."""
    set_verbosity(verbose=verbose, quiet=quiet)
    if not verbose:
        from mio.noise import quiet as filter_noise

        filter_noise()


if __name__ == "__main__":
    sys.exit(main())
