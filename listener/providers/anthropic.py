"""Anthropic: courses through the Messages API, with the course schema as the
input schema of one forced tool, so the answer arrives as structured tool input."""

from __future__ import annotations

import json
from typing import Any

import anthropic

from listener.providers import pricing
from listener.providers.base import Answer, CoursePrompt, Usage, repair_request
from listener.settings import Settings

TOOL = "save_course"


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
        messages: list[Any] = [{"role": "user", "content": prompt.user}]
        if prompt.repair:
            previous, problem = prompt.repair
            messages.append({"role": "assistant", "content": previous or "(no answer)"})
            messages.append({"role": "user", "content": repair_request(problem)})
        resp = await self.client.messages.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=prompt.system,
            messages=messages,
            tools=[
                {
                    "name": TOOL,
                    "description": "Save the generated course.",
                    "input_schema": prompt.schema,
                }
            ],
            tool_choice={"type": "tool", "name": TOOL},
        )
        text = ""
        for block in resp.content:
            if block.type == "tool_use" and block.name == TOOL:
                text = json.dumps(block.input)
                break
            if block.type == "text" and not text:
                text = block.text  # no tool call: let validation say what is wrong
        usage = Usage(resp.usage.input_tokens, resp.usage.output_tokens)
        usage.cost_usd = pricing.token_cost(
            resp.model or self.model, usage.input_tokens, usage.output_tokens
        )
        return Answer(text, resp.model or self.model, usage)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        await self.client.close()
