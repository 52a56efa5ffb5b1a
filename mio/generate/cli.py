"""`mio generate`: interleaved any-to-any generation from the command line.

    mio generate --model runs/demo/model --prompt "What is in this picture?" --image cat.jpg --out answers/cat
    mio generate --model MIO-7B-Instruct --preset mio-release --task tts --outputs speech --prompt "Say hello." --out hi
    mio generate --model runs/demo/model --prompts prompts.jsonl --batch-size 8 --out answers/
    mio generate --model runs/demo/model --preset guided --outputs image --prompt "A red rocket." --out rocket

With --prompts, each line of the JSONL file is one prompt, ``{"prompt": "What is this? {image}",
"image": ["cat.jpg"], "id": "cat"}`` (media paths relative to the file; ``id`` names the answer's
folder under --out, default the line number), and the prompts are generated --batch-size at a
time with the same settings; each answer goes where a single prompt's would. Under torchrun (or
srun) the batches are spread over the ranks, each rank on its own GPU; the files are those one
process writes, and rank 0 prints the answers in prompt order:

    torchrun --nproc_per_node 8 -m mio.cli generate --model runs/sft/model --prompts prompts.jsonl --out answers/

Media files go where the prompt names them: {image}, {speech}, {video} take the next file of
their kind in command-line order; MIO's <image_placeholder_0>, <speech_placeholder_1> name a
file by its index among the files of its kind. Files the prompt does not name follow the text.
Writes transcript.md, transcript.html, generation.json and the decoded media into --out; prints the answer (its
text, and the path of each media file) and then the transcript's path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mio.dtypes import DTYPES
from mio.generate.media import MediaFile
from mio.generate.prompt import prompt_items
from mio.generate.settings import PRESETS, overrides_from_strings
from mio.generate.spread import Spread
from mio.log import info
from mio.segments import Text
from mio.userio import MioUserError, run_command
from mio.vocab import IMAGE, SPEECH, VIDEO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model folder (ours, or MIO's release layout)")
    p.add_argument("--prompt", default="", help="the user's text; {image}/{speech}/{video} or MIO's "
                   "<image_placeholder_N>/<speech_placeholder_N> mark where files go")
    for kind in (IMAGE, SPEECH, VIDEO):
        p.add_argument(f"--{kind}", dest="media", action="append", default=[], type=lambda f, k=kind: MediaFile(k, Path(f)),
                       metavar="FILE", help=f"a {kind} file of the prompt (repeatable)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a JSONL file of prompts (instead of --prompt and media flags), generated in batches")
    p.add_argument("--batch-size", type=int, default=8, help="prompts of --prompts decoded together")
    p.add_argument("--out", type=Path, required=True, help="folder for the transcript and the decoded media")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="tokenizer specs (*.yaml) and/or MIO's checkpoint tree; replaces the specs the model folder records")
    p.add_argument("--unclip", type=Path, default=None, help="a StableUnCLIPImg2ImgPipeline folder for decoding images")
    p.add_argument("--raw", action="store_true", help="no chat template: the model continues the prompt as it is")
    p.add_argument("--task", default=None,
                   help="SFT task name; tts or speech_generation select MIO's speech-only system prompt; with "
                        "--preset mio-release it picks the release's settings (text, image_generation, tts, "
                        "speech_generation, speech_to_speech, video_generation, interleaved)")
    p.add_argument("--outputs", default=None,
                   help="comma-separated modalities the answer may contain, of text,image,speech,video "
                        "(default: every one the model has tokens for); without text the answer is media only")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="decoding defaults: paper (Table 8: text by beam search, media sampled), mio-release "
                        "(MIO's infer.py: one setting per task for the whole answer, 512 new tokens, stop at "
                        "<|im_end|> in chat and at EOS with --raw), or guided (Table 8 with images and video "
                        "frames under classifier-free guidance 3 and top-k 2000)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer in tokens (default: the preset's, 1024 or 512); capped at what the "
                        "model's positions allow")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and the unCLIP noise")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="MODALITY.FIELD=VALUE",
                   help="override a setting of the preset, e.g. text.num_beams=1, speech.repetition_penalty=1.2 or "
                        "image.guidance=3 (classifier-free guidance inside image blocks; 1 = off) "
                        "(MODALITY: text, image, video, speech or all)")
    p.add_argument("--negative-prompt", default=None,
                   help="with guidance: the unconditional branch's user text (default: the condition removed, "
                        "an empty user turn)")
    p.add_argument("--max-speech-frames", type=int, default=750, help="longest speech answer in frames (50 per second)")
    p.add_argument("--steps", type=int, default=20, help="unCLIP denoising steps")
    p.add_argument("--guidance", type=float, default=10.0,
                   help="unCLIP guidance scale (the image decoder's; the token guidance is --set image.guidance=S)")
    p.add_argument("--noise-level", type=int, default=0, help="unCLIP noise level added to the image embedding")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; for checks)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model weights' type (default: bfloat16 on CUDA, float32 on CPU)")
    return p


def generate_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def prompts_file(path: Path) -> list[tuple[str, list[Text | MediaFile]]]:
    """``--prompts`` lines -> (answer folder name, prompt items), every line checked first."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    out: list[tuple[str, list[Text | MediaFile]]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MioUserError(f"{where}: not a JSON object: {err}") from None
        if not isinstance(row, dict) or set(row) - {"prompt", "id", IMAGE, SPEECH, VIDEO}:
            raise MioUserError(f"{where}: a prompt line is an object with prompt, id, image, speech, video (lists of "
                             f"files); got {line[:80]!r}")
        media = [MediaFile(k, path.parent / f) for k in (IMAGE, SPEECH, VIDEO)
                 for f in ([row[k]] if isinstance(row.get(k), str) else row.get(k, []))]
        try:
            items = prompt_items(str(row.get("prompt", "")), media)
            for item in items:
                if isinstance(item, MediaFile):
                    item.check()
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        name = str(row.get("id", f"{len(out) + 1:04d}"))
        if not name or "/" in name or name in (".", "..") or name in {o[0] for o in out}:
            raise MioUserError(f"{where}: id {name!r} must be a unique, non-empty folder name")
        out.append((name, items))
    if not out:
        raise MioUserError(f"--prompts {path} holds no prompt")
    return out


def _run(args: argparse.Namespace) -> int:
    from mio.generate.detok import UnclipSettings
    from mio.generate.generator import Generator

    if args.prompts is not None and (args.prompt or args.media):
        raise MioUserError("give either --prompts FILE or --prompt and media files, not both")
    if args.batch_size < 1:
        raise MioUserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.prompts is not None:
        jobs = prompts_file(args.prompts)
    else:
        jobs = [("", prompt_items(args.prompt, args.media))]
        for item in jobs[0][1]:
            if isinstance(item, MediaFile):
                item.check()
    unclip = UnclipSettings(steps=args.steps, guidance_scale=args.guidance, noise_level=args.noise_level, seed=args.seed)
    overrides = overrides_from_strings(args.overrides)
    outputs = None if args.outputs is None else [o.strip() for o in args.outputs.split(",") if o.strip()]
    spread = Spread.from_env()
    try:
        gen = Generator(args.model, args.tokenizers, unclip=args.unclip, device=spread.device(args.device),
                        dtype=DTYPES[args.dtype] if args.dtype else None)
        gen.media.local_rank = spread.ranks.local_rank  # its tokenizers on this rank's GPU
        batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
        shown = []
        for b in spread.batches(len(batches)):
            chunk = batches[b]
            results = gen.generate_batch([items for _, items in chunk], chat=not args.raw, task=args.task,
                                         preset=args.preset, max_new_tokens=args.max_new_tokens, settings=overrides,
                                         outputs=outputs, seed=args.seed, use_cache=not args.no_cache,
                                         max_speech_frames=args.max_speech_frames,
                                         negative_prompt=args.negative_prompt)
            answers = []
            for (name, _), result in zip(chunk, results):
                for note in result.result.notes:
                    info(note)
                written = gen.write(result, args.out / name, unclip)
                info(f"{name + ': ' if name else ''}{len(result.result.ids)} new tokens in "
                     f"{result.result.seconds:.1f}s ({result.result.tokens_per_second:.1f}/s), stopped by "
                     f"{result.stopped}")
                answers.append(f"{written.answer() or '(empty answer)'}\ntranscript: {written.transcript}")
            if spread.ranks.world == 1:  # alone: each answer as soon as it is written
                print("\n".join(answers), flush=True)
            shown.append((b, answers))
        if spread.ranks.world > 1:  # rank 0 prints every rank's answers, in prompt order
            for answers in spread.gather(shown) or []:
                print("\n".join(answers), flush=True)
    finally:
        spread.close()
    return 0


if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
