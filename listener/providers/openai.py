"""OpenAI: courses through Chat Completions with a strict JSON-schema response
format, images through the Images API, audio through the Speech API."""

from __future__ import annotations

import base64
import time
from typing import Any

import openai

from listener.providers import pricing, ratelimits, requests
from listener.providers.base import Answer, CoursePrompt, Media, Usage
from listener.providers.download import download
from listener.settings import Settings

PROMPT_CACHE_KEY = requests.PROMPT_CACHE_KEY


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        assert settings.openai_api_key is not None
        self.model = settings.openai_model
        self.image_model = settings.openai_image_model
        self.tts_model = settings.openai_tts_model
        self.max_tokens = settings.ai_max_output_tokens
        self.timeout = settings.ai_timeout_seconds
        self.base_url = settings.openai_base_url
        # One shared client: it pools connections. Retries are ours (next provider,
        # then the job's own retry), so the SDK's are off.
        self.client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url or None,
            timeout=settings.ai_timeout_seconds,
            max_retries=0,
        )

    async def course(self, prompt: CoursePrompt) -> Answer:
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        raw = await self.client.chat.completions.with_raw_response.create(
            **requests.openai_course(self.model, self.max_tokens, prompt)
        )
        limits = ratelimits.parse(raw.headers, sent)
        return requests.openai_answer(raw.parse(), self.model, limits)

    def media_model(self, media_type: str) -> str:
        return self.image_model if media_type == "image" else self.tts_model

    async def image(self, prompt: str, size: str) -> Media:
        extra: dict[str, Any] = {}
        if self.image_model.startswith("dall-e"):
            extra["response_format"] = "b64_json"  # gpt-image models always answer base64
        sent = time.time()
        raw = await self.client.images.with_raw_response.generate(
            model=self.image_model, prompt=prompt, size=size, n=1, **extra
        )
        resp = raw.parse()
        if not resp.data:
            raise ValueError("the images API returned no image")
        first = resp.data[0]
        if first.b64_json:
            data = base64.b64decode(first.b64_json)
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
