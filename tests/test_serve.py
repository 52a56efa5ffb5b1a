"""`mio serve` through the official `openai` client against a real uvicorn server on 127.0.0.1.

- a greedy chat answer equals `mio generate`'s for the same prompt and settings (text, ids' count);
- image in, image out (a decodable PNG), speech out (a WAV), the answer streamed (its deltas add
  up to the answer sent whole), images.generate, audio.speech, audio.transcriptions, /v1/models;
- the API key: 401 without the bearer token, answers with it.
"""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import soundfile as sf
from PIL import Image as PILImage
from serve_support import CAT, CLIP, b64, data_url, model_folder, running
from test_generate_support import one_thread  # noqa: F401 (autouse fixture)

from mio.generate.cli import generate_main
from mio.generate.generator import Generator
from mio.serve.app import ServeConfig

GREEDY = ["all.num_beams=1", "all.do_sample=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def generator(folder):
    return Generator(folder, device="cpu")


@pytest.fixture(scope="module")
def client(generator):
    with running(generator) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_greedy_chat_equals_mio_generate(client, folder, tmp_path, capsys):
    prompt = "a cat sitting on a mat"
    r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=24, seed=5)
    assert generate_main(["--model", str(folder), "--prompt", prompt, "--out", str(tmp_path / "g"), "--outputs", "text",
                          "--max-new-tokens", "24", "--seed", "5", *[x for s in GREEDY for x in ("--set", s)]]) == 0
    record = json.loads((tmp_path / "g" / "generation.json").read_text())
    expected = "".join(a["text"] for a in record["answer"] if a["kind"] == "text")
    assert expected.strip() and r.choices[0].message.content == expected
    assert r.usage.completion_tokens == len(record["new_ids"]) and r.usage.prompt_tokens == len(record["prompt_ids"])
    assert r.choices[0].finish_reason == ("stop" if len(record["new_ids"]) < 24 else "length")
    # `set` (mio's --set) gives the same answer as OpenAI's temperature 0
    same = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}], max_tokens=24,
                                          seed=5, extra_body={"set": GREEDY})
    assert same.choices[0].message.content == expected
    capsys.readouterr()


def test_models_lists_the_folder(client):
    assert [m.id for m in client.models.list().data] == ["model"]
    assert client.models.retrieve("model").id == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_image_in_image_out(client):
    r = client.chat.completions.create(
        model="model", modalities=["image"], max_tokens=40, seed=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Draw this again:"},
                                               {"type": "image_url", "image_url": {"url": data_url(CAT, "image/jpeg")}}]}])
    parts = r.choices[0].message.content
    assert isinstance(parts, list) and parts[0]["type"] == "image_url", parts
    head, data = parts[0]["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64"
    picture = PILImage.open(io.BytesIO(base64.b64decode(data)))
    picture.load()
    assert picture.format == "PNG" and picture.size[0] > 0
    assert r.usage.prompt_tokens > 34  # the photo's 32 codes and its markers are in the prompt


def test_speech_in_speech_out(client):
    r = client.chat.completions.create(
        model="model", modalities=["audio"], audio={"voice": "alloy", "format": "wav"}, max_tokens=60, seed=2,
        extra_body={"max_speech_frames": 4},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(CLIP), "format": "wav"}},
                                               {"type": "text", "text": "Say it back."}]}])
    audio = r.choices[0].message.audio
    assert audio is not None
    wave, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)))
    assert rate > 0 and len(wave) > 0


def test_stream_adds_up_to_the_whole_answer(client):
    kw = dict(model="model", messages=[{"role": "user", "content": "hello world"}], temperature=0, max_tokens=30)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Media parts arrive as their blocks close, in the order of the whole answer.
    kw = dict(model="model", messages=[{"role": "user", "content": "a picture"}], modalities=["image"], seed=3,
              max_tokens=70)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = [p for c in client.chat.completions.create(stream=True, **kw) if c.choices
                and isinstance(c.choices[0].delta.content, list) for p in c.choices[0].delta.content]
    assert [p["image_url"]["url"] for p in streamed] == [p["image_url"]["url"] for p in whole if p["type"] == "image_url"]
    assert streamed


def test_n_choices_are_seeded_one_after_another(client):
    kw = dict(model="model", messages=[{"role": "user", "content": "hello"}], temperature=1.0, max_tokens=12)
    both = client.chat.completions.create(n=2, seed=7, **kw)
    second = client.chat.completions.create(n=1, seed=8, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].message.content == second.choices[0].message.content


@pytest.mark.slow
def test_images_speech_and_transcriptions(client):
    images = client.images.generate(model="model", prompt="a red rocket", n=1, response_format="b64_json")
    picture = PILImage.open(io.BytesIO(base64.b64decode(images.data[0].b64_json)))
    picture.load()
    assert picture.format == "PNG"
    speech = client.audio.speech.create(model="model", voice="alloy", input="hello world", response_format="wav",
                                        extra_body={"max_speech_frames": 4})
    wave, rate = sf.read(io.BytesIO(speech.content))
    assert rate > 0 and len(wave) > 0
    with open(CLIP, "rb") as fh:
        heard = client.audio.transcriptions.create(model="model", file=fh, extra_body={"set": GREEDY, "max_tokens": 30})
    assert isinstance(heard.text, str)
    # The transcription is the chat answer to the same prompt (mio's ASR task wording).
    chat = client.chat.completions.create(
        model="model", temperature=0, max_tokens=30, extra_body={"task": "asr"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Please transcribe this speech.\n"},
                                               {"type": "input_audio", "input_audio": {"data": b64(CLIP), "format": "wav"}}]}])
    assert heard.text == chat.choices[0].message.content


def test_api_key(generator):
    with running(generator, ServeConfig(api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["model"]
        import httpx

        r = httpx.post(f"{url}/v1/chat/completions", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/nowhere").status_code == 401
        assert httpx.get(url + "/").status_code == 200  # the page itself holds nothing; its calls need the key
