"""Anthropic: courses through the Messages API, with the course schema as the
input schema of one forced tool, so the answer arrives as structured tool input,
streamed: the raw events are read here (the SDK's stream helper re-parses the
whole tool input at every delta), the tool input's JSON fed to the progress
reader as it arrives, the usage from message_start and message_delta."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

import anthropic

from listener.providers import pricing, ratelimits
from listener.providers.base import (
    FIRST_TOKEN_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    Answer,
    CoursePrompt,
    Refused,
    StreamStalled,
    TextSink,
    Usage,
    repair_request,
    watched,
)
from listener.settings import Settings

TOOL = "save_course"


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: Settings) -> None:
        assert settings.anthropic_api_key is not None
        self.model = settings.anthropic_model
        self.max_tokens = settings.ai_max_output_tokens
        self.first_token_timeout = min(FIRST_TOKEN_TIMEOUT_SECONDS, settings.ai_timeout_seconds)
        self.idle_timeout = min(IDLE_TIMEOUT_SECONDS, settings.ai_timeout_seconds)
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url or None,
            timeout=settings.ai_timeout_seconds,
            max_retries=0,
        )

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        messages: list[Any] = [{"role": "user", "content": prompt.user}]
        if prompt.repair:
            previous, problem = prompt.repair
            messages.append({"role": "assistant", "content": previous or "(no answer)"})
            messages.append({"role": "user", "content": repair_request(problem)})
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        try:
            async with asyncio.timeout(self.first_token_timeout):
                raw = await self.client.messages.with_raw_response.create(
                    model=self.model,
                    max_tokens=self.max_tokens,
                    # The prompt cache covers the tools (the schema) and the system
                    # block up to this breakpoint: the constant part of every request.
                    system=[
                        {
                            "type": "text",
                            "text": prompt.system,
                            "cache_control": {"type": "ephemeral"},
                        }
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
                    stream=True,
                )
                stream = await raw.parse()
        except TimeoutError:
            raise StreamStalled(
                f"stream stalled: no answer within {self.first_token_timeout:g}s"
            ) from None
        limits = ratelimits.parse(raw.headers, sent)
        model, stop = self.model, None
        inp = cached = written = out = 0
        tool: list[str] = []  # the forced tool's input, as JSON text
        prose: list[str] = []  # text blocks: no tool call, validation says what is wrong
        blocks: dict[int, str] = {}  # index -> "tool" | "text" | other
        try:
            # Any: the event union does not narrow on a saved `type`
            events: AsyncGenerator[Any, None] = watched(
                stream, self.first_token_timeout, self.idle_timeout, _has_text
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    kind = event.type
                    if kind == "content_block_delta":
                        d = event.delta
                        where = blocks.get(event.index)
                        if d.type == "input_json_delta" and where == "tool":
                            tool.append(d.partial_json)
                            if sink is not None:
                                sink(d.partial_json)
                        elif d.type == "text_delta" and where == "text":
                            prose.append(d.text)
                    elif kind == "content_block_start":
                        b = event.content_block
                        is_tool = b.type == "tool_use" and b.name == TOOL
                        blocks[event.index] = "tool" if is_tool else b.type
                    elif kind == "message_start":
                        m = event.message
                        model = m.model or model
                        u = m.usage
                        inp, out = u.input_tokens, u.output_tokens
                        cached = u.cache_read_input_tokens or 0
                        written = u.cache_creation_input_tokens or 0
                    elif kind == "message_delta":
                        stop = event.delta.stop_reason or stop
                        out = event.usage.output_tokens  # cumulative
                        # newer APIs may report the input here too
                        inp = getattr(event.usage, "input_tokens", None) or inp
        finally:
            await stream.close()
        # Anthropic's input_tokens leaves out the cached and cache-written ones.
        usage = Usage(inp + cached + written, out)
        usage.cached_input_tokens, usage.cache_write_tokens = cached, written
        usage.cost_usd = pricing.token_cost(
            model, usage.input_tokens, usage.output_tokens, cached, written
        )
        if stop == "refusal":
            raise Refused("the model declined (stop_reason refusal)", usage, limits)
        if stop == "model_context_window_exceeded":
            raise Refused("context window exceeded", usage, limits)
        called = "tool" in blocks.values()
        text = ("".join(tool) or "{}") if called else "".join(prose)
        return Answer(text, model, usage, limits)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        await self.client.close()


def _has_text(event: Any) -> bool:
    return bool(event.type == "content_block_delta")
