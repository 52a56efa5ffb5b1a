"""`mio serve` left running: bad requests, limits, a full queue, memory, SIGTERM.

- the bad-request battery: each bad request gets OpenAI's error object with its status (400,
  401, 404, 413, 422, 503) and the server answers the next good request;
- a full queue answers 503 with Retry-After, the requests it took are answered;
- 1,000 mixed good and bad requests: the process's RSS grows by at most 10% (slow);
- SIGTERM: a streamed answer in flight is finished, then the process ends (slow).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image as PILImage
from serve_support import CAT, CLIP, data_url, free_port, model_folder, running
from test_generate_support import ROOT, one_thread  # noqa: F401 (autouse fixture)

from mio.generate.generator import Generator
from mio.serve.app import ServeConfig
from mio.serve.limits import ServeLimits
from mio.userio import MioUserError

LIMITS = ServeLimits(max_body_bytes=300_000, max_image_pixels=250 * 250, max_audio_seconds=5.0, max_n=2)
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def generator(folder):
    return Generator(folder, device="cpu")


@pytest.fixture(scope="module")
def url(generator):
    with running(generator, ServeConfig(LIMITS)) as base:
        yield base


def chat(**fields):
    return {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **GREEDY, **fields}


def with_part(part):
    return chat(messages=[{"role": "user", "content": [{"type": "text", "text": "look:"}, part]}])


def image(url_: str):
    return {"type": "image_url", "image_url": {"url": url_}}


def audio(data: bytes):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def png(size: int) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def b64url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


CLIP_BYTES = CLIP.read_bytes()
# (name, method, path, request keywords, status, error code)
BAD = [
    ("malformed JSON", "POST", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ("bad base64", "POST", "/v1/chat/completions", {"json": with_part(image("data:image/png;base64,@@@not base64"))}, 400, "invalid_base64"),
    ("not an image", "POST", "/v1/chat/completions", {"json": with_part(image(b64url(b"hello, not a picture")))}, 400, "invalid_image"),
    ("truncated image", "POST", "/v1/chat/completions", {"json": with_part(image(b64url(CAT.read_bytes()[:3000], "image/jpeg")))}, 400, "invalid_image"),
    ("file: URL", "POST", "/v1/chat/completions", {"json": with_part(image(f"file://{CAT}"))}, 400, "unsupported_url"),
    ("http: URL", "POST", "/v1/chat/completions", {"json": with_part(image("http://127.0.0.1:9/cat.jpg"))}, 400, "unsupported_url"),
    ("bare path", "POST", "/v1/chat/completions", {"json": with_part(image(str(CAT)))}, 400, "unsupported_url"),
    ("not a WAV", "POST", "/v1/chat/completions", {"json": with_part(audio(b"ID3 an mp3, say"))}, 400, "invalid_audio"),
    ("truncated WAV", "POST", "/v1/chat/completions", {"json": with_part(audio(CLIP_BYTES[:len(CLIP_BYTES) // 2]))}, 400, "invalid_audio"),
    ("unknown model", "POST", "/v1/chat/completions", {"json": chat(model="gpt-4")}, 404, "model_not_found"),
    ("unknown modality", "POST", "/v1/chat/completions", {"json": chat(modalities=["text", "smell"])}, 400, "invalid_modality"),
    ("prompt over the context", "POST", "/v1/chat/completions", {"json": chat(messages=[{"role": "user", "content": "a cat sitting on a mat " * 300}])}, 400, "context_length_exceeded"),
    ("max_tokens over the positions", "POST", "/v1/chat/completions", {"json": chat(max_tokens=5000)}, 400, "context_length_exceeded"),
    ("n over the limit", "POST", "/v1/chat/completions", {"json": chat(n=3)}, 400, "n_too_large"),
    ("unknown setting", "POST", "/v1/chat/completions", {"json": chat(set=["text.beams=3"])}, 400, "invalid_settings"),
    ("unknown preset", "POST", "/v1/chat/completions", {"json": chat(preset="fastest")}, 400, "invalid_settings"),
    ("bad conversation", "POST", "/v1/chat/completions", {"json": chat(messages=[{"role": "assistant", "content": "hi"}])}, 400, "invalid_conversation"),
    ("wrong type", "POST", "/v1/chat/completions", {"json": chat(max_tokens="many")}, 422, "invalid_value"),
    ("no messages", "POST", "/v1/chat/completions", {"json": {"model": "model"}}, 422, "invalid_value"),
    ("unknown part", "POST", "/v1/chat/completions", {"json": with_part({"type": "video_url", "video_url": "x"})}, 422, "invalid_value"),
    ("body too large", "POST", "/v1/chat/completions", {"json": chat(messages=[{"role": "user", "content": "a" * 400_000}])}, 413, "request_too_large"),
    ("image too large", "POST", "/v1/chat/completions", {"json": with_part(image(b64url(png(300))))}, 413, "image_too_large"),
    ("audio too long", "POST", "/v1/chat/completions", {"json": with_part(audio(wav(6.0)))}, 413, "audio_too_long"),
    ("image url format", "POST", "/v1/images/generations", {"json": {"prompt": "a cat", "response_format": "url"}}, 400, "unsupported_format"),
    ("speech mp3", "POST", "/v1/audio/speech", {"json": {"model": "model", "input": "hi", "voice": "alloy", "response_format": "mp3"}}, 400, "unsupported_format"),
    ("transcription without file", "POST", "/v1/audio/transcriptions", {"data": {"model": "model"}}, 400, "missing_file"),
    ("transcription of a non-WAV", "POST", "/v1/audio/transcriptions", {"data": {"model": "model"}, "files": {"file": ("a.wav", b"not audio")}}, 400, "invalid_audio"),
    ("unknown path", "GET", "/v1/nowhere", {}, 404, "not_found"),
]


def send(client: httpx.Client, base: str, method: str, path: str, kw: dict) -> httpx.Response:
    return client.request(method, base + path, **kw)


def test_bad_requests_get_openai_errors_and_the_server_serves_on(url):
    with httpx.Client(timeout=120) as client:
        for name, method, path, kw, status, code in BAD:
            r = send(client, url, method, path, kw)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and err["type"], (name, err)
        good = client.post(url + "/v1/chat/completions", json=with_part(image(data_url(CAT, "image/jpeg"))))
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"
        heard = client.post(url + "/v1/audio/transcriptions", data={"model": "model", "max_tokens": "3"},
                            files={"file": ("clip.wav", CLIP_BYTES)})
        assert heard.status_code == 200 and isinstance(heard.json()["text"], str)


@pytest.mark.parametrize("error, status, code", [(MioUserError("the request must change"), 400, "invalid_request"),
                                                 (ValueError("mio's own bug"), 500, "internal_error"),
                                                 (FileNotFoundError("the server's own folder"), 500, "internal_error")])
def test_what_the_request_must_fix_is_a_400_and_mios_own_failures_are_500s(generator, monkeypatch, error, status, code):
    """Only a MioUserError blames the request: a ValueError from mio's own code, or a missing file
    (a request names none), is the server's failure, and the server serves on."""
    real = generator.prepare_batch

    def fails(*args, **kwargs):
        raise error

    with running(generator, ServeConfig(LIMITS)) as base, httpx.Client(timeout=120) as client:
        monkeypatch.setattr(generator, "prepare_batch", fails)
        r = client.post(base + "/v1/chat/completions", json=chat())
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text[:300]
        assert str(error) in r.json()["error"]["message"]
        monkeypatch.setattr(generator, "prepare_batch", real)
        assert client.post(base + "/v1/chat/completions", json=chat()).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(generator):
    with running(generator, ServeConfig(ServeLimits(max_queue=1))) as base:
        body = chat(max_tokens=120, temperature=1.0, seed=1)
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.post(base + "/v1/chat/completions", json=body), range(4)))
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["retry-after"] == str(ServeLimits().retry_after_s)
        assert busy.json()["error"]["code"] == "server_busy"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_a_thousand_mixed_requests_leak_no_memory(url):
    good = [("POST", "/v1/chat/completions", {"json": chat()}),
            ("POST", "/v1/chat/completions", {"json": with_part(image(data_url(CAT, "image/jpeg")))}),
            ("POST", "/v1/chat/completions", {"json": with_part(audio(CLIP_BYTES))}),
            ("POST", "/v1/chat/completions", {"json": chat(stream=True)}),
            ("GET", "/v1/models", {})]
    bad = [(method, path, kw) for _, method, path, kw, _, _ in BAD]
    mixed = [good[i % len(good)] if i % 2 else bad[i % len(bad)] for i in range(1000)]
    with httpx.Client(timeout=120) as client:
        for method, path, kw in mixed[:150]:  # warm-up: allocator pools, caches, first-use buffers
            send(client, url, method, path, kw)
        before = rss_bytes()
        statuses = [send(client, url, method, path, kw).status_code for method, path, kw in mixed]
        after = rss_bytes()
    assert statuses.count(200) == 500 and all(s in (400, 404, 413, 422) for s in statuses if s != 200)
    assert after <= 1.10 * before, (before, after)


@pytest.mark.slow
def test_sigterm_finishes_the_answer_in_flight_then_exits(folder):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mio.cli", "serve", str(folder), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no start"
            time.sleep(0.2)
        lines: list[str] = []
        signalled: list[int] = []
        # Images only: the model (biased towards <image>) answers block after block up to the limit.
        body = chat(stream=True, max_tokens=340, modalities=["image"], seed=4)
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:  # mid-answer: the role chunk and two images are here
                    proc.send_signal(signal.SIGTERM)
                    signalled.append(len(lines))
        assert signalled and lines[-1] == "data: [DONE]" and len(lines) > signalled[0] + 1
        last = json.loads(lines[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        # uvicorn drains, then re-raises the signal it caught: the status of a process SIGTERM ended.
        assert proc.wait(60) == -signal.SIGTERM
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
