"""The server-sent events reader both providers' streams go through
(listener/providers/base.py: stream_events, watched): events as the SSE format
frames them, `[DONE]` ends, data that is not a JSON object is a malformed stream,
and the stall clocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from listener.providers.base import MalformedStream, StreamStalled, stream_events, watched


class Response:
    def __init__(self, lines: list[str], delays: dict[int, float] | None = None) -> None:
        self.lines, self.delays = lines, delays or {}

    async def aiter_lines(self) -> AsyncIterator[str]:
        for n, line in enumerate(self.lines):
            if n in self.delays:
                await asyncio.sleep(self.delays[n])
            yield line


async def read(lines: list[str], **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    events = watched(stream_events(Response(lines, kw.get("delays"))), 1.0, 1.0, lambda e: True)
    return [e async for e in events]


async def test_events_as_framed() -> None:
    lines = [
        ": a keep-alive comment",
        "event: message_start",
        'data: {"type": "message_start"}',
        "",
        "",  # blank lines between events are nothing
        'data: {"a":',
        "data: 1}",  # data over two lines: joined with a newline
        "",
        'data:{"no": "space"}',
        "",
        "data: [DONE]",
        "",
        'data: {"after": "done"}',
        "",
    ]
    assert await read(lines) == [
        ("message_start", {"type": "message_start"}),
        ("", {"a": 1}),
        ("", {"no": "space"}),
    ]


async def test_a_last_event_without_its_blank_line_is_not_taken() -> None:
    assert await read(['data: {"a": 1}', "", 'data: {"cut": true}']) == [("", {"a": 1})]


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"', "null", "\ufffd"])
async def test_data_that_is_not_a_json_object(data: str) -> None:
    with pytest.raises(MalformedStream, match="malformed stream event"):
        await read([f"data: {data}", ""])


async def test_the_stall_clocks() -> None:
    lines = ['data: {"a": 1}', "", 'data: {"b": 2}', ""]

    async def run(first: float, idle: float, delays: dict[int, float]) -> int:
        events = watched(stream_events(Response(lines, delays)), first, idle, lambda e: True)
        return len([e async for e in events])

    assert await run(0.5, 0.5, {0: 0.1, 2: 0.1}) == 2
    with pytest.raises(StreamStalled, match=r"no first token within 0\.1s"):
        await run(0.1, 5, {0: 0.3})
    with pytest.raises(StreamStalled, match=r"no token within 0\.1s"):
        await run(5, 0.1, {2: 0.3})


async def test_tokens_move_the_stall_clock_without_a_timer_each() -> None:
    """A thousand tokens in a row set the stall timer a handful of times, not once
    each (a timer per token cost a tenth of a worker's CPU at 500 streams)."""
    lines = [line for n in range(1000) for line in (f'data: {{"n": {n}}}', "")]
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return call_at(when, callback, *args, **kw)

    loop.call_at = counted  # type: ignore[method-assign,assignment]
    try:
        events = watched(stream_events(Response(lines)), 30.0, 15.0, lambda e: True)
        assert len([e async for e in events]) == 1000
    finally:
        loop.call_at = call_at  # type: ignore[method-assign]
    assert timers <= 3


async def test_a_stall_after_many_tokens_is_still_seen() -> None:
    lines = [line for n in range(200) for line in (f'data: {{"n": {n}}}', "")]
    events = watched(stream_events(Response(lines, {300: 0.5})), 5.0, 0.1, lambda e: True)
    seen = 0
    with pytest.raises(StreamStalled, match=r"no token within 0\.1s"):
        async for _ in events:
            seen += 1
    assert seen == 150
