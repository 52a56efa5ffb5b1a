"""The request bodies of the OpenAI endpoints mio serves (pydantic), with mio's own extra fields.

OpenAI's fields keep OpenAI's names and meanings. mio's own go beside them as extra fields
(the ``openai`` client's ``extra_body``): ``preset``, ``set`` (a list of the ``MODALITY.FIELD=VALUE``
overrides ``mio generate --set`` takes, so a setting any part of mio adds passes through), ``task``
and ``max_speech_frames``. Fields OpenAI has that mio cannot honour are accepted where a client
sends them by default and ignored (``user``, ``voice``...), or refused where ignoring them would
give a wrong answer (a ``response_format`` other than what is served).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class MioFields(_Body):
    """mio's own decoding fields, common to every generating endpoint."""

    preset: str = "paper"
    overrides: list[str] = Field(default_factory=list, alias="set")
    task: str | None = None
    max_speech_frames: int = Field(750, ge=1)
    seed: int = 0


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: str
    format: str = "wav"


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[Union[TextPart, ImagePart, AudioPart], Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part], None] = None


class AudioOutput(_Body):
    voice: str | None = None
    format: str = "wav"


class ChatRequest(MioFields):
    model: str
    messages: list[Message] = Field(min_length=1)
    modalities: list[str] | None = None  # text, image, audio (OpenAI's name for speech)
    audio: AudioOutput | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)


class ImageRequest(MioFields):
    model: str | None = None
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    response_format: str = "b64_json"
    size: str | None = None
    max_tokens: int | None = Field(None, ge=1)


class SpeechRequest(MioFields):
    model: str
    input: str = Field(min_length=1)
    voice: str | None = None
    response_format: str = "wav"
    max_tokens: int | None = Field(None, ge=1)


class TranscriptionRequest(MioFields):
    """The form fields of /v1/audio/transcriptions beside its file."""

    model: str | None = None
    response_format: str = "json"
    max_tokens: int | None = Field(None, ge=1)
