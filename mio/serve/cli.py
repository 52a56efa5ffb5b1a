"""`mio serve`: an OpenAI-compatible server over a model folder, with a chat page at /.

    mio serve runs/sft/model                      # http://127.0.0.1:8000/ (the page), /v1/... (the API)
    MIO_API_KEY=secret mio serve runs/sft/model --host 0.0.0.0 --port 8000

Endpoints: /v1/models, /v1/chat/completions (text, image_url data: URLs and input_audio WAV in;
text, images and speech out; stream), /v1/images/generations (b64_json), /v1/audio/speech (wav),
/v1/audio/transcriptions (multipart WAV). It binds 127.0.0.1 unless --host says otherwise; with
--api-key (or MIO_API_KEY) every endpoint wants "Authorization: Bearer KEY". SIGTERM (or Ctrl-C)
lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mio.dtypes import DTYPES
from mio.log import info
from mio.serve.limits import ServeLimits
from mio.userio import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mio serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="model folder (ours, or MIO's release layout)")
    p.add_argument("--tokenizers", type=Path, default=None, help="tokenizer specs / MIO checkpoint tree, as in mio generate")
    p.add_argument("--unclip", type=Path, default=None, help="a StableUnCLIPImg2ImgPipeline folder for decoding images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model weights' type (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MIO_API_KEY"),
                   help="the bearer token every endpoint wants (default: $MIO_API_KEY; none: no check)")
    p.add_argument("--model-name", default=None, help="the model id /v1/models lists (default: the folder's name)")
    d = ServeLimits()
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (413 past it)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest image in a request")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds, help="longest audio in a request")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most choices (or images) one request may ask for")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting or decoding at once; past it, 503 with Retry-After")
    return p


def serve_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from mio.generate.generator import Generator
    from mio.serve.app import ServeConfig, create_app

    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                         max_audio_seconds=args.max_audio_seconds, max_n=args.max_n, max_queue=args.max_queue)
    gen = Generator(args.model, args.tokenizers, unclip=args.unclip, device=args.device,
                    dtype=DTYPES[args.dtype] if args.dtype else None)
    app = create_app(gen, ServeConfig(limits, api_key=args.api_key or None, model_name=args.model_name))
    info(f"serving {args.model} at http://{args.host}:{args.port}/ (API under /v1"
        f"{', bearer token required' if args.api_key else ''})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
