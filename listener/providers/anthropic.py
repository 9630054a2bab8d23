"""Anthropic: courses through the Messages API, with the course schema as the
input schema of one forced tool, so the answer arrives as structured tool input,
streamed: the events are read here from the response (the SDK's stream helper re-parses
the whole tool input at every delta, and its typed events cost more CPU than
all the rest), the tool input's JSON fed to the progress reader as it arrives,
the usage from message_start and message_delta.

The SDK is imported at the first call, not at the worker's start: it takes
seconds of CPU on a small machine (3.5 s on the project's 2-core one, more than
the rest of the worker), which a worker whose calls and batches go to another
provider first never needs to spend."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
from typing import Any

from listener.providers import requests
from listener.providers.base import (
    FIRST_TOKEN_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    Answer,
    CoursePrompt,
    MalformedStream,
    TextSink,
    error_kind,
    number,
    open_stream,
    sdk_transport,
    stream_events,
    watched,
)
from listener.settings import Settings

TOOL = requests.TOOL


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: Settings) -> None:
        assert settings.anthropic_api_key is not None
        self.model = settings.anthropic_model
        self.max_tokens = settings.ai_max_output_tokens
        self.first_token_timeout = min(FIRST_TOKEN_TIMEOUT_SECONDS, settings.ai_timeout_seconds)
        self.idle_timeout = min(IDLE_TIMEOUT_SECONDS, settings.ai_timeout_seconds)
        self._key = settings.anthropic_api_key
        self._base_url = settings.anthropic_base_url or None
        self._timeout = settings.ai_timeout_seconds
        self._client: Any = None
        self._importing: asyncio.Future[Any] | None = None

    @property
    def client(self) -> Any:
        """The SDK's client, made at its first use."""
        if self._client is None:
            import anthropic

            self._client = anthropic.AsyncAnthropic(
                api_key=self._key.get_secret_value(),
                base_url=self._base_url,
                timeout=self._timeout,
                max_retries=0,
                **sdk_transport(anthropic),
            )
        return self._client

    async def ready(self) -> Any:
        """The client; the first time, its SDK imported in a thread (one for all
        the calls that wait for it), so that the jobs already running on this
        loop go on meanwhile. The chain awaits it before it times the call."""
        if self._client is None:
            if self._importing is None:
                load = asyncio.to_thread(importlib.import_module, "anthropic")
                self._importing = asyncio.ensure_future(load)
                self._importing.add_done_callback(self._imported)
            await asyncio.shield(self._importing)
        return self.client

    def _imported(self, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            self._importing = None  # a failed import is tried again at the next call

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        client = await self.ready()
        # The raw response: its rate-limit headers too (the quotas learn from them).
        sent = time.time()
        create = client.messages.with_raw_response.create(
            **requests.anthropic_course(self.model, self.max_tokens, prompt), stream=True
        )
        raw, limits = await open_stream(create, self.first_token_timeout, sent)
        response = raw.http_response  # the body not read yet: read here, event by event
        model, stop = self.model, None
        inp = cached = written = out = 0
        tool: list[str] = []  # the forced tool's input, as JSON text
        prose: list[str] = []  # text blocks: no tool call, validation says what is wrong
        blocks: dict[Any, str] = {}  # index -> "tool" | "text" | other
        try:
            events = watched(
                stream_events(response), self.first_token_timeout, self.idle_timeout, _has_text
            )
            async with contextlib.aclosing(events):
                async for _, event in events:
                    kind = event.get("type")
                    if kind == "content_block_delta":
                        d = event["delta"]
                        where = blocks.get(event.get("index"))
                        if d.get("type") == "input_json_delta" and where == "tool":
                            piece = d.get("partial_json")
                            if isinstance(piece, str) and piece:
                                tool.append(piece)
                                if sink is not None:
                                    sink(piece)
                        elif d.get("type") == "text_delta" and where == "text":
                            prose.append(str(d.get("text") or ""))
                    elif kind == "content_block_start":
                        b = event["content_block"]
                        is_tool = b.get("type") == "tool_use" and b.get("name") == TOOL
                        blocks[event.get("index")] = "tool" if is_tool else str(b.get("type"))
                    elif kind == "message_start":
                        m = event["message"]
                        if isinstance(m.get("model"), str):
                            model = m["model"] or model
                        u = m.get("usage") or {}
                        inp, out = number(u.get("input_tokens")), number(u.get("output_tokens"))
                        cached = number(u.get("cache_read_input_tokens"))
                        written = number(u.get("cache_creation_input_tokens"))
                    elif kind == "message_delta":
                        stop = (event.get("delta") or {}).get("stop_reason") or stop
                        u = event.get("usage") or {}
                        out = number(u.get("output_tokens")) or out  # cumulative
                        inp = number(u.get("input_tokens")) or inp  # newer APIs say it here too
                    elif kind == "error":  # overloaded, or any error mid-stream
                        raise MalformedStream(f"stream error: {error_kind(event.get('error'))}")
        except (AttributeError, TypeError, KeyError) as exc:  # not the documented shape
            raise MalformedStream(f"malformed stream event ({type(exc).__name__})") from None
        finally:
            await response.aclose()
        usage = requests.anthropic_usage(model, limits, (inp, out, cached, written), stop)
        called = "tool" in blocks.values()
        text = ("".join(tool) or "{}") if called else "".join(prose)
        return Answer(text, model, usage, limits, stop if isinstance(stop, str) else None)

    async def check(self) -> str:
        page = await self.client.models.list()
        return f"{len(page.data)} models"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


def _has_text(event: tuple[str, dict[str, Any]]) -> bool:
    return event[1].get("type") == "content_block_delta"
