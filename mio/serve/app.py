"""The OpenAI-compatible web app over a :class:`Generator` (FastAPI).

    app = create_app(Generator("runs/sft/model"), ServeConfig())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``/v1/models``, ``/v1/chat/completions`` (text, image and audio in; text, images and
speech out; ``stream``), ``/v1/images/generations``, ``/v1/audio/speech``,
``/v1/audio/transcriptions``, and the chat page at ``/``. Every refusal is OpenAI's error object
with status 400 (bad request), 401 (no or wrong API key), 404 (unknown model or path), 413 (over
a limit), 422 (a field of the wrong type) or 503 (queue full, with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mio.generate.decoding import STOP, PromptTooLong, position_limit
from mio.generate.generator import Generator
from mio.generate.media import MediaFile
from mio.generate.results import Generation
from mio.generate.settings import TABLE8, get_preset, overrides_from_strings, resolve_settings
from mio.segments import Text
from mio.serve.answer import Piece, Streamer, pieces
from mio.serve.engine import Busy, Engine, GenerateOptions, Job, Ticket
from mio.serve.limits import RequestError, ServeLimits, b64decode, check_image, check_wav, data_url_bytes
from mio.serve.page import PAGE
from mio.serve.schemas import ChatRequest, ImageRequest, MioFields, SpeechRequest, TranscriptionRequest
from mio.templates import PAIR_TASKS, Turn, check_conversation
from mio.userio import MioUserError
from mio.vocab import IMAGE, SPEECH, TEXT

LOG = logging.getLogger("mio.serve")
# OpenAI's output modality names -> mio's.
MODALITIES = {"text": TEXT, "image": IMAGE, "audio": SPEECH}


@dataclass(frozen=True)
class ServeConfig:
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key: str | None = None  # every endpoint but the page wants ``Authorization: Bearer KEY``
    model_name: str | None = None  # the id /v1/models lists (default: the model folder's name)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """``app`` on a real uvicorn server in a thread of this process (the tests, `mio bench serve`);
    yields its base URL (``port`` 0: a free one); on exit it drains and stops."""
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mio-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(120)


def create_app(generator: Generator, config: ServeConfig = ServeConfig()) -> FastAPI:
    engine = Engine(generator, config.limits.max_queue)
    served = _Served(generator, engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:  # uvicorn has waited for every open request (SIGTERM drains); the thread ends after them
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="mio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(_Guard, api_key=config.api_key, max_body=config.limits.max_body_bytes)
    _add_error_handlers(app, config.limits)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        served.check_model(model_id)
        return served.model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response | dict[str, Any]:
        return await _answer(served.chat(body, request))

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest, request: Request) -> dict[str, Any]:
        return await _answer(served.images(body, request))

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request) -> Response:
        return await _answer(served.speech(body, request))

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def transcriptions(request: Request) -> Response | dict[str, Any]:
        return await _answer(served.transcriptions(request))

    return app


class _Served:
    """The handlers' work: requests -> jobs -> OpenAI's response shapes."""

    def __init__(self, generator: Generator, engine: Engine, config: ServeConfig) -> None:
        self.gen, self.engine, self.config, self.limits = generator, engine, config, config.limits
        self.name = config.model_name or Path(generator.name).name
        self.created = int(time.time())
        self.positions = position_limit(generator.model)

    # --- shared ------------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "mio"}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves {self.name!r}", "model",
                               "model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise RequestError(400, f"n is {n}, over the server's limit of {self.limits.max_n} (--max-n)", "n",
                               "n_too_large")

    def check_max_tokens(self, value: int | None, param: str) -> None:
        if value is not None and self.positions is not None and value > self.positions:
            raise RequestError(400, f"{param} is {value}, more than the model's {self.positions} positions "
                                    "(max_position_embeddings)", param, "context_length_exceeded")

    def options(self, body: MioFields, outputs: tuple[str, ...], max_tokens: int | None,
                sampling: dict[str, Any] | None = None, task: str | None = None) -> GenerateOptions:
        """mio's fields (preset, ``set`` overrides), with OpenAI's sampling fields under them, checked
        now so that a bad setting is a 400 before anything is queued."""
        try:
            preset = get_preset(body.preset)
            settings: dict[str, dict[str, Any]] = {"all": dict(sampling)} if sampling else {}
            for mode, fields in overrides_from_strings(body.overrides).items():
                settings.setdefault(mode, {}).update(fields)
            resolve_settings(settings, TABLE8)  # every field and value checked against DecodeSettings
            task = body.task or task
            if task is not None and len(preset.tasks) > 1:
                preset.task_of(task, outputs, False)
        except ValueError as e:
            raise RequestError(400, str(e), "set", "invalid_settings") from None
        self.check_max_tokens(max_tokens, "max_tokens")
        return GenerateOptions(chat=True, task=task, preset=body.preset, max_new_tokens=max_tokens, settings=settings,
                               outputs=outputs, seed=body.seed, max_speech_frames=body.max_speech_frames)

    async def run(self, turns: list[Turn], options: GenerateOptions, n: int, request: Request,
                  stream: bool = False) -> list[Ticket]:
        """Encode the turns' media, submit ``n`` jobs (seeds ``seed``, ``seed + 1``, ...) and wait
        until each has started (so a prompt the model cannot take is still a 400)."""
        try:
            check_conversation(turns, for_training=False)
        except ValueError as e:
            raise RequestError(400, str(e), "messages", "invalid_conversation") from None
        encoded = await self.engine.encode(turns)
        tickets: list[Ticket] = []
        try:
            for i in range(n):
                tickets.append(self.engine.submit(Job(encoded, _with_seed(options, options.seed + i)), stream))
            for t in tickets:
                await _started(t, request)
        except BaseException:
            for t in tickets:
                t.cancel()
            raise
        return tickets

    # --- /v1/chat/completions ------------------------------------------------------------------
    async def chat(self, body: ChatRequest, request: Request) -> Response | dict[str, Any]:
        self.check_model(body.model)
        self.check_n(body.n)
        outputs = self.outputs(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        options = self.options(body, outputs, max_tokens, _sampling(body.temperature, body.top_p))
        with tempfile.TemporaryDirectory(prefix="mio-serve-") as tmp:
            turns = self.turns(body, Path(tmp))
            tickets = await self.run(turns, options, body.n, request, stream=body.stream)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(self.stream(cid, tickets, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            generations = [await _finished(t, request) for t in tickets]
        finally:
            for t in tickets:
                t.cancel()  # a no-op for finished ones; the others stop decoding
        choices = [{"index": i, "message": await self.message(g), "finish_reason": _finish(g), "logprobs": None}
                   for i, g in enumerate(generations)]
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": _usage(generations)}

    def outputs(self, body: ChatRequest) -> tuple[str, ...]:
        wanted = body.modalities or ["text"]
        unknown = [m for m in wanted if m not in MODALITIES]
        if unknown:
            raise RequestError(400, f"unknown modality {unknown}; expected some of {sorted(MODALITIES)}", "modalities",
                               "invalid_modality")
        outputs = tuple(dict.fromkeys(MODALITIES[m] for m in wanted))
        try:
            self.gen._check_outputs(outputs)
        except ValueError as e:
            raise RequestError(400, str(e), "modalities", "invalid_modality") from None
        if body.audio is not None and body.audio.format != "wav":
            raise RequestError(400, f"audio.format {body.audio.format!r} is not served; this server answers in wav",
                               "audio.format", "unsupported_format")
        return outputs

    def turns(self, body: ChatRequest, tmp: Path) -> list[Turn]:
        """The messages as turns; their media written to ``tmp`` (checked first), where the
        generator's own encoding reads them."""
        turns = []
        for m, message in enumerate(body.messages):
            content: list[Any] = []
            parts = [message.content] if isinstance(message.content, str) else message.content or []
            for p, part in enumerate(parts):
                param = f"messages[{m}].content[{p}]"
                if isinstance(part, str):
                    content.append(Text(part))
                elif part.type == "text":
                    content.append(Text(part.text))
                elif part.type == "image_url":
                    data = data_url_bytes(part.image_url.url, f"{param}.image_url.url")
                    check_image(data, self.limits, f"{param}.image_url")
                    content.append(_media_file(tmp, IMAGE, data, ".img"))
                else:
                    if part.input_audio.format != "wav":
                        raise RequestError(400, f"{param}.input_audio.format {part.input_audio.format!r} is not "
                                                "served; send a WAV", f"{param}.input_audio.format", "unsupported_format")
                    data = b64decode(part.input_audio.data, f"{param}.input_audio.data")
                    check_wav(data, self.limits, f"{param}.input_audio")
                    content.append(_media_file(tmp, SPEECH, data, ".wav"))
            turns.append(Turn(message.role, content))
        return turns

    async def message(self, generation: Generation) -> dict[str, Any]:
        """OpenAI's assistant message: text (as parts when images come with it), images as data
        URLs in their places, speech as ``audio`` (one WAV of every speech block, with the text)."""
        parts = pieces(generation.segments)
        text = "".join(p.text for p in parts if p.kind == TEXT)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if any(p.kind == IMAGE for p in parts):
            message["content"] = [await self.part(p) for p in parts if p.kind != SPEECH]
        speech = [p.segment for p in parts if p.kind == SPEECH]
        if speech:
            _, wav = await self.engine.render_speech(speech)
            message["audio"] = {"id": f"audio-{uuid.uuid4().hex}", "data": base64.b64encode(wav).decode(),
                                "expires_at": int(time.time()) + 3600, "transcript": text}
        return message

    async def part(self, p: Piece) -> dict[str, Any]:
        if p.kind == TEXT:
            return {"type": "text", "text": p.text}
        assert p.segment is not None
        mime, data = await self.engine.render(p.segment)
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}

    async def stream(self, cid: str, tickets: list[Ticket], request: Request) -> AsyncIterator[str]:
        """Server-sent events: text deltas as they are decoded, each image or speech block once it
        closes, a last chunk with the finish reason per choice, then ``[DONE]``."""
        created = int(time.time())

        def chunk(i: int, delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": self.name, "choices": [{"index": i, "delta": delta,
                                                                           "finish_reason": finish}]}) + "\n\n"

        streamers = [Streamer(self.gen.table, self.gen.tokenizer, self.gen.text_decoder,
                              self.gen.stop_ids_for(get_preset(t.job.options.preset), t.job.options.chat))
                     for t in tickets]
        try:
            for i in range(len(tickets)):
                yield chunk(i, {"role": "assistant", "content": ""})
            ended = [False] * len(tickets)
            while not all(ended):
                for i, (t, s) in enumerate(zip(tickets, streamers)):
                    if ended[i]:
                        continue
                    done, ids = t.done, t.ids
                    if t.error is not None:
                        raise t.error
                    current = pieces(t.generation.segments) if done and t.generation else s.so_far(ids)
                    for p in s.new(current, final=done):
                        yield chunk(i, await self.delta(p))
                    if done:
                        assert t.generation is not None
                        yield chunk(i, {}, _finish(t.generation))
                        ended[i] = True
                if not all(ended):
                    await _any_change([t for t, e in zip(tickets, ended) if not e])
            yield "data: [DONE]\n\n"
        except Exception as err:  # noqa: BLE001 -- the stream has begun: the error goes in it
            yield "data: " + json.dumps(_error_of(err).body()) + "\n\n"
        finally:  # the client went away (the generator is closed) or the answer is complete
            for t in tickets:
                t.cancel()

    async def delta(self, p: Piece) -> dict[str, Any]:
        if p.kind == TEXT:
            return {"content": p.text}
        if p.kind == IMAGE:
            return {"content": [await self.part(p)]}
        assert p.segment is not None
        _, wav = await self.engine.render_speech([p.segment])
        return {"audio": {"id": f"audio-{uuid.uuid4().hex}", "data": base64.b64encode(wav).decode(), "transcript": ""}}

    # --- /v1/images/generations, /v1/audio/speech, /v1/audio/transcriptions ---------------------
    async def images(self, body: ImageRequest, request: Request) -> dict[str, Any]:
        self.check_model(body.model)
        self.check_n(body.n)
        if body.response_format != "b64_json":
            raise RequestError(400, f"response_format {body.response_format!r} is not served; use b64_json (the server "
                                    "stores no files to link to)", "response_format", "unsupported_format")
        options = self.options(body, (IMAGE,), body.max_tokens)
        text = PAIR_TASKS["descriptive_image_generation"].replace("{text}", body.prompt)
        tickets = await self.run([Turn("user", [Text(text)])], options, body.n, request)
        data = []
        for t in tickets:
            g = await _finished(t, request)
            first = next((p for p in pieces(g.segments) if p.kind == IMAGE), None)
            if first is None:
                raise RequestError(500, f"the model's answer held no complete image ({_finish(g)})", None,
                                   "no_image", kind="server_error")
            _, png = await self.engine.render(first.segment)  # type: ignore[arg-type]
            data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None})
        return {"created": int(time.time()), "data": data}

    async def speech(self, body: SpeechRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.response_format != "wav":
            raise RequestError(400, f"response_format {body.response_format!r} is not served; use wav",
                               "response_format", "unsupported_format")
        options = self.options(body, (SPEECH,), body.max_tokens, task="tts")
        text = PAIR_TASKS["tts"].replace("{text}", body.input)
        g = await _finished((await self.run([Turn("user", [Text(text)])], options, 1, request))[0], request)
        speech = [p.segment for p in pieces(g.segments) if p.kind == SPEECH]
        if not speech:
            raise RequestError(500, f"the model's answer held no complete speech ({_finish(g)})", None, "no_speech",
                               kind="server_error")
        _, wav = await self.engine.render_speech(speech)
        return Response(wav, media_type="audio/wav")

    async def transcriptions(self, request: Request) -> Response | dict[str, Any]:
        try:
            form = await request.form()
        except StarletteHTTPException:
            raise
        except Exception as e:  # noqa: BLE001 -- a body that is not multipart form data
            raise RequestError(400, f"a transcription request is multipart form data with a file: {e}", "file",
                               "invalid_form") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "the form has no file (a WAV)", "file", "missing_file")
        fields: dict[str, Any] = {k: str(v) for k, v in form.items() if k not in ("file", "set", "set[]")}
        fields["set"] = [str(v) for k in ("set", "set[]") for v in form.getlist(k)]  # the openai client sends set[]
        try:
            body = TranscriptionRequest.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            raise RequestError(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0]),
                               "invalid_value") from None
        if body.response_format not in ("json", "text"):
            raise RequestError(400, f"response_format {body.response_format!r} is not served; use json or text",
                               "response_format", "unsupported_format")
        self.check_model(body.model)
        options = self.options(body, (TEXT,), body.max_tokens, task="asr")
        data = await upload.read()
        check_wav(data, self.limits, "file")
        before, _, after = PAIR_TASKS["asr"].partition("{media}")
        with tempfile.TemporaryDirectory(prefix="mio-serve-") as tmp:
            content = [Text(before), _media_file(Path(tmp), SPEECH, data, ".wav")] + ([Text(after)] if after else [])
            tickets = await self.run([Turn("user", content)], options, 1, request)
        g = await _finished(tickets[0], request)
        text = "".join(p.text for p in pieces(g.segments) if p.kind == TEXT)
        return PlainTextResponse(text) if body.response_format == "text" else {"text": text}


def _with_seed(o: GenerateOptions, seed: int) -> GenerateOptions:
    return replace(o, seed=seed)


def _sampling(temperature: float | None, top_p: float | None) -> dict[str, Any] | None:
    """OpenAI's sampling fields as mio settings for every modality: temperature 0 is greedy; a
    temperature or top_p samples one token at a time (no beams)."""
    if temperature is None and top_p is None:
        return None
    if temperature == 0:
        return {"num_beams": 1, "do_sample": False}
    out: dict[str, Any] = {"num_beams": 1, "do_sample": True}
    if temperature is not None:
        out["temperature"] = temperature
    if top_p is not None:
        out["top_p"] = top_p
    return out


def _media_file(tmp: Path, kind: str, data: bytes, suffix: str) -> MediaFile:
    path = tmp / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    return MediaFile(kind, path)


def _finish(g: Generation) -> str:
    return "stop" if g.stopped == STOP else "length"


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = len(generations[0].prompt_ids)
    completion = sum(len(g.result.ids) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _watch(request: Request, waiting: Callable[[], Awaitable[None]]) -> None:
    """Wait for ``waiting()``; a client that disconnects meanwhile cancels the wait."""
    task = asyncio.ensure_future(waiting())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("the client disconnected")
        task.result()
    finally:
        task.cancel()


async def _started(t: Ticket, request: Request) -> None:
    """Until the job has its first tokens (or has ended); a failure is raised here."""
    async def wait() -> None:
        while not t.done and not t.ids:
            await t.changed()
    await _watch(request, wait)
    if t.error is not None:
        raise t.error


async def _finished(t: Ticket, request: Request) -> Generation:
    async def wait() -> None:
        await t.result()
    await _watch(request, wait)
    assert t.generation is not None
    return t.generation


async def _any_change(tickets: list[Ticket]) -> None:
    waits = [asyncio.ensure_future(t.changed()) for t in tickets]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# --- errors and the guard ----------------------------------------------------------------------
async def _answer(work: Awaitable[Any]) -> Any:
    """A handler's result; its failures as request errors (a 500 is logged with its traceback)."""
    try:
        return await work
    except (RequestError, StarletteHTTPException, asyncio.CancelledError):
        raise
    except Exception as err:  # noqa: BLE001 -- every failure answers the request; the server serves on
        answer = _error_of(err)
        if answer.status == 500:
            LOG.exception("request failed")
        raise answer from None


def _error_of(err: BaseException) -> RequestError:
    """Any failure -> the request error it answers with: what the request must fix (a
    ``MioUserError``: a prompt over the context, a setting the preset refuses) is a 400, the queue
    full a 503, anything else a 500 -- mio's own ValueErrors included, and a missing file, which
    only the server's folders can be (a request names no file)."""
    if isinstance(err, RequestError):
        return err
    if isinstance(err, Busy):
        return RequestError(503, str(err), None, "server_busy", kind="server_error")
    if isinstance(err, MioUserError):
        return RequestError(400, str(err), None,
                            "context_length_exceeded" if isinstance(err, PromptTooLong) else "invalid_request")
    return RequestError(500, f"{type(err).__name__}: {err}", None, "internal_error", kind="server_error")


def _add_error_handlers(app: FastAPI, limits: ServeLimits) -> None:
    def respond(err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(limits.retry_after_s)} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return respond(err)

    @app.exception_handler(Busy)
    async def busy(_: Request, err: Busy) -> JSONResponse:
        return respond(_error_of(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if any(e.get("type") == "json_invalid" for e in errors):
            return respond(RequestError(400, f"the body is not valid JSON: {first.get('msg', '')}", None, "invalid_json"))
        return respond(RequestError(422, f"{where or 'body'}: {first.get('msg', 'invalid')}", where or None,
                                    "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code, "http_error")
        return respond(RequestError(err.status_code, str(err.detail), None, code))

    @app.exception_handler(Exception)
    async def other(_: Request, err: Exception) -> JSONResponse:
        return respond(_error_of(err))


class _Guard:
    """ASGI middleware before everything: the API key (``Authorization: Bearer``) on every path but
    the page, and the body-size limit (413), counted as the body arrives whatever its headers say."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and not (scope["path"] == "/" and scope["method"] == "GET"):
            given = headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
                await _send_error(send, RequestError(401, "a valid API key is needed: Authorization: Bearer KEY", None,
                                                     "invalid_api_key"))
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, self._too_large())
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> RequestError:
        return RequestError(413, f"the request body is over the server's limit of {self.max_body} bytes "
                                 "(--max-body-bytes)", None, "request_too_large")


async def _send_error(send: Send, err: RequestError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
