"""OpenAI: courses through Chat Completions with a strict JSON-schema response
format, streamed (the text fed to the progress reader as it arrives, the usage
from the stream's last chunk), images through the Images API, audio through the
Speech API."""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any

import openai

from listener.providers import pricing, ratelimits, requests
from listener.providers.base import (
    FIRST_TOKEN_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    Answer,
    CoursePrompt,
    MalformedStream,
    Media,
    TextSink,
    Usage,
    error_kind,
    number,
    open_stream,
    sdk_transport,
    stream_events,
    watched,
)
from listener.providers.download import download
from listener.settings import Settings


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.openai_api_key is not None
        self.model = settings.openai_model
        self.image_model = settings.openai_image_model
        self.tts_model = settings.openai_tts_model
        self.max_tokens = settings.ai_max_output_tokens
        self.timeout = settings.ai_timeout_seconds
        self.first_token_timeout = min(FIRST_TOKEN_TIMEOUT_SECONDS, self.timeout)
        self.idle_timeout = min(IDLE_TIMEOUT_SECONDS, self.timeout)
        self.base_url = settings.openai_base_url
        # One shared client: it pools connections. Retries are ours (next provider,
        # then the job's own retry), so the SDK's are off.
        self.client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url or None,
            timeout=settings.ai_timeout_seconds,
            max_retries=0,
            **sdk_transport(openai),
        )

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        create = self.client.chat.completions.with_raw_response.create(
            **requests.openai_course(self.model, self.max_tokens, prompt),
            stream=True,
            stream_options={"include_usage": True},
        )
        raw, limits = await open_stream(create, self.first_token_timeout, sent)
        response = raw.http_response  # the body not read yet: read here, event by event
        text: list[str] = []
        refusal: list[str] = []
        model, finish, counted = self.model, None, None
        try:
            events = watched(
                stream_events(response), self.first_token_timeout, self.idle_timeout, _has_text
            )
            async with contextlib.aclosing(events):
                async for _, chunk in events:
                    if "error" in chunk:  # an error in the middle of the stream
                        raise MalformedStream(f"stream error: {error_kind(chunk['error'])}")
                    if isinstance(chunk.get("model"), str):
                        model = chunk["model"] or model
                    if isinstance(chunk.get("usage"), dict):
                        counted = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        content = delta.get("content")
                        if content and isinstance(content, str):
                            text.append(content)
                            if sink is not None:
                                sink(content)
                        if delta.get("refusal") and isinstance(delta["refusal"], str):
                            refusal.append(delta["refusal"])
                        finish = choice.get("finish_reason") or finish
        except (AttributeError, TypeError) as exc:  # not the shape OpenAI documents
            raise MalformedStream(f"malformed stream event ({type(exc).__name__})") from None
        finally:
            await response.aclose()
        usage = Usage()
        if counted is not None:
            details = counted.get("prompt_tokens_details")
            cached = number(details.get("cached_tokens")) if isinstance(details, dict) else 0
            usage = Usage(
                number(counted.get("prompt_tokens")), number(counted.get("completion_tokens"))
            )
            usage.cached_input_tokens = cached
        requests.openai_settle(usage, model, limits, "".join(refusal), finish)
        return Answer(
            "".join(text), model, usage, limits, finish if isinstance(finish, str) else None
        )

    def media_model(self, media_type: str) -> str:
        return self.image_model if media_type == "image" else self.tts_model

    async def image(self, prompt: str, size: str) -> Media:
        sent = time.time()
        raw = await self.client.images.with_raw_response.generate(
            **requests.openai_image(self.image_model, prompt, size)
        )
        resp = raw.parse()
        if not resp.data:
            raise ValueError("the images API returned no image")
        first = resp.data[0]
        if first.b64_json:
            data = base64.b64decode(first.b64_json, validate=True)  # garbage: ValueError
        elif first.url:  # the answer's URL is untrusted input (providers/download.py)
            data = await download(first.url, self.timeout, trusted_base=self.base_url)
        else:
            raise ValueError("the images API returned neither data nor a URL")
        usage = Usage(cost_usd=pricing.image_cost(self.image_model))
        limits = ratelimits.parse(raw.headers, sent)
        return Media(data, "png", "image/png", self.image_model, usage, limits)

    async def speech(self, text: str, voice: str, fmt: str) -> Media:
        sent = time.time()
        raw = await self.client.audio.speech.with_raw_response.create(
            model=self.tts_model,
            voice=voice,
            input=text,
            response_format=fmt,  # type: ignore[arg-type]  # checked by MediaParams
        )
        audio = raw.parse().content
        usage = Usage(cost_usd=pricing.speech_cost(self.tts_model, len(text)))
        limits = ratelimits.parse(raw.headers, sent)
        ctype = _AUDIO_TYPES.get(fmt, "audio/mpeg")
        return Media(audio, fmt, ctype, self.tts_model, usage, limits)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        await self.client.close()


_AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}


def _has_text(event: tuple[str, dict[str, Any]]) -> bool:
    for choice in event[1].get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("refusal")):
            return True
    return False
