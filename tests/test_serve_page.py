"""The chat page at / in a real browser: Debian's chromium, headless, driven by Playwright.

- the bundled cat photo attached, a caption asked for: the streamed answer is the text the API
  gives for the same message;
- an image asked for: the answer's <img> holds a decodable PNG;
- speech asked for: the answer's <audio> source is a WAV of non-zero length.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image as PILImage
from serve_support import CAT, data_url, model_folder, running
from test_generate_support import one_thread  # noqa: F401 (autouse fixture)

from mio.generate.generator import Generator

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; "
                                                              "`make test` installs it)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gen = Generator(model_folder(tmp_path_factory.mktemp("serve")), device="cpu")
    with running(gen) as url:
        yield url


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.goto(served + "/")
            yield page
        finally:
            browser.close()


def ask(page, text: str, outputs: list[str], max_tokens: int, attach: Path | None = None):
    """Ask on the page; the answer's element once its stream has ended."""
    page.click("#reset")
    for kind in ("text", "image", "audio"):
        page.set_checked(f"#out-{kind}", kind in outputs)
    page.fill("#max-tokens", str(max_tokens))
    if attach is not None:
        page.set_input_files("#file", str(attach))
    page.fill("#prompt", text)
    page.click("#send")
    answer = page.locator(".assistant").last
    page.wait_for_function("() => { const a = [...document.querySelectorAll('.assistant')].pop(); "
                           "return a && a.dataset.state !== 'streaming'; }", timeout=240_000)
    assert answer.get_attribute("data-state") == "done", answer.inner_text()
    return answer


def payload(src: str, mime: str) -> bytes:
    head, data = src.split(",", 1)
    assert head == f"data:{mime};base64", head
    return base64.b64decode(data)


def test_caption_of_the_cat_photo(page, served):
    import httpx

    answer = ask(page, "What is in this picture?", ["text"], 16, attach=CAT)
    shown = page.locator(".user").last.locator("img")
    assert shown.count() == 1
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(CAT, "image/jpeg")}},
                                            {"type": "text", "text": "What is in this picture?"}]}]
    r = httpx.post(served + "/v1/chat/completions", timeout=120,
                   json={"model": "model", "messages": message, "max_tokens": 16})
    expected = r.json()["choices"][0]["message"]["content"]
    assert expected and answer.locator("span").first.text_content() == expected


def test_image_answer_is_a_png(page):
    answer = ask(page, "Draw a cat.", ["image"], 40)
    img = answer.locator("img").first
    picture = PILImage.open(io.BytesIO(payload(img.get_attribute("src"), "image/png")))
    picture.load()
    assert picture.format == "PNG" and min(picture.size) > 0
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", img.element_handle())  # the browser drew it


def test_speech_answer_is_a_wav(page):
    answer = ask(page, "Say hello.", ["audio"], 200)
    audio = answer.locator("audio").first
    wave, rate = sf.read(io.BytesIO(payload(audio.get_attribute("src"), "audio/wav")))
    assert rate > 0 and len(wave) > 0
