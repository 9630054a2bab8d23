"""Anthropic: courses through the Messages API, with the course schema as the
input schema of one forced tool, so the answer arrives as structured tool input."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic

from listener.providers import pricing, ratelimits
from listener.providers.base import Answer, CoursePrompt, Refused, Usage, repair_request
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
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        raw = await self.client.messages.with_raw_response.create(
            model=self.model,
            max_tokens=self.max_tokens,
            # The prompt cache covers the tools (the schema) and the system block up to
            # this breakpoint: the constant part of every course request.
            system=[
                {"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}
            ],
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
        resp = await raw.parse()
        limits = ratelimits.parse(raw.headers, sent)
        model = resp.model or self.model
        u = resp.usage
        cached, written = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
        # Anthropic's input_tokens leaves out the cached and cache-written ones.
        usage = Usage(u.input_tokens + cached + written, u.output_tokens)
        usage.cached_input_tokens, usage.cache_write_tokens = cached, written
        usage.cost_usd = pricing.token_cost(
            model, usage.input_tokens, usage.output_tokens, cached, written
        )
        if resp.stop_reason == "refusal":
            raise Refused("the model declined (stop_reason refusal)", usage, limits)
        if resp.stop_reason == "model_context_window_exceeded":
            raise Refused("context window exceeded", usage, limits)
        text = ""
        for block in resp.content:
            if block.type == "tool_use" and block.name == TOOL:
                text = json.dumps(block.input)
                break
            if block.type == "text" and not text:
                text = block.text  # no tool call: let validation say what is wrong
        return Answer(text, model, usage, limits)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        await self.client.close()
