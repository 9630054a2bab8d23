"""Anthropic: courses through the Messages API, with the course schema as the
input schema of one forced tool, so the answer arrives as structured tool input."""

from __future__ import annotations

import time

import anthropic

from listener.providers import ratelimits, requests
from listener.providers.base import Answer, CoursePrompt
from listener.settings import Settings

TOOL = requests.TOOL


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: Settings) -> None:
        assert settings.anthropic_api_key is not None
        self.model = settings.anthropic_model
        self.max_tokens = settings.ai_max_output_tokens
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url or None,
            timeout=settings.ai_timeout_seconds,
            max_retries=0,
        )

    async def course(self, prompt: CoursePrompt) -> Answer:
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        raw = await self.client.messages.with_raw_response.create(
            **requests.anthropic_course(self.model, self.max_tokens, prompt)
        )
        resp = await raw.parse()
        limits = ratelimits.parse(raw.headers, sent)
        return requests.anthropic_answer(resp, self.model, limits)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        await self.client.close()
