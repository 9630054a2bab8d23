"""What the fake answers: a course built from the prompt, sized to a drawn number of
tokens; the pace it comes at; and the server-sent events of both providers' streams.

Tokens are counted as 4 characters each (rounded up), for prompts and answers
alike, so the usage reported, the pace and the quotas all agree."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
FILLER = " It builds on the item before it and prepares the one after it."


def tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Pace:
    """How an answer is produced: the time to its first token, then `tps` tokens a
    second (0: all at once), and its size in tokens drawn from `size` (lo, hi) with a
    triangular distribution peaked midway, seeded by `seed`, the request's messages
    and how often they were asked before (None: the bare course, about 1,000 tokens
    for 3 groups of 12). A stream sends `chunk` tokens an event (0: about 20 events a
    second at `tps`, 16 tokens when instant)."""

    ttft: float = 0.0
    tps: float = 0.0
    size: tuple[int, int] | None = None
    seed: int = 0
    chunk: int = 0

    def draw(self, key: str, nth: int) -> int | None:
        if self.size is None:
            return None
        digest = hashlib.sha256(f"{self.seed}:{key}:{nth}".encode()).digest()
        lo, hi = self.size
        return round(random.Random(digest).triangular(lo, hi))

    def chunk_tokens(self) -> int:
        return self.chunk or (max(1, round(self.tps / 20)) if self.tps else 16)

    def due(self, start: float, n: int) -> float:
        """When the n-th token (1-based) is ready, for a request that arrived at `start`."""
        return start + self.ttft + ((n - 1) / self.tps if self.tps and n > 1 else 0.0)


def course_from_prompt(prompt: str) -> dict[str, Any]:
    def field_(name: str, default: str) -> str:
        m = re.search(rf"^{name}: (.+)$", prompt, re.MULTILINE)
        return m.group(1).strip() if m else default

    subject = field_("Write a course on", "Something")
    groups = int(field_("Groups", "3"))
    per_group = int(field_("Items per group", "12"))
    return {
        "id": field_("Course id", "something"),
        "title": f"Learning {subject}",
        "subject": subject,
        "description": f"A fake course on {subject}.",
        "level": field_("Level", "beginner"),
        "language": field_("Language", "English").split(" (")[0],
        "groups": [
            {
                "id": f"g{g}",
                "title": f"Part {g}",
                "summary": f"Part {g} of {subject}.",
                "items": [
                    {
                        "id": f"g{g}-i{i}",
                        "prompt": f"Question {i}?",
                        "answer": f"Answer {i}",
                        "explanation": "Because.",
                        "options": [],
                    }
                    for i in range(1, per_group + 1)
                ],
            }
            for g in range(1, groups + 1)
        ],
    }


def sized(course: dict[str, Any], target: int) -> dict[str, Any]:
    """The course with longer explanations, so that its JSON is `target` tokens (a
    course already larger stays as it is). The filler is plain ASCII: one character
    added is one character of JSON."""
    extra = target * CHARS_PER_TOKEN - len(json.dumps(course))
    items = [it for g in course["groups"] for it in g["items"]]
    if extra <= 0 or not items:
        return course
    per, rest = divmod(extra, len(items))
    for n, item in enumerate(items):
        want = per + (n < rest)
        filler = FILLER * (want // len(FILLER) + 1)
        item["explanation"] += filler[:want]
    return course


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class OpenAIStream:
    """Chat completion chunks: a role delta with the first text, text deltas, a
    final chunk with the finish reason, the usage chunk when asked, `[DONE]`."""

    def __init__(self, model: str, include_usage: bool, refusal: bool) -> None:
        self.model, self.include_usage, self.refusal = model, include_usage, refusal
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    def opening(self) -> bytes:
        return b""

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def delta(self, text: str) -> bytes:
        return self._chunk({"refusal" if self.refusal else "content": text})

    def closing(self, finish: str, usage: dict[str, Any]) -> bytes:
        out = self._chunk({}, finish)
        if self.include_usage:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
            out += sse(data)
        return out + b"data: [DONE]\n\n"


class AnthropicStream:
    """Messages events: message_start (with the input usage) at once; at the first
    token content_block_start and a ping; text_delta (or, for a tool call,
    input_json_delta) events; content_block_stop, message_delta (stop reason,
    output usage), message_stop."""

    def __init__(self, model: str, tool: str | None, usage: dict[str, int]) -> None:
        self.model, self.tool, self.usage = model, tool, usage

    def opening(self) -> bytes:
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self.usage, "output_tokens": 1},
        }
        return sse({"type": "message_start", "message": message}, "message_start")

    def first(self) -> bytes:
        block: dict[str, Any] = {"type": "text", "text": ""}
        if self.tool:
            block = {"type": "tool_use", "id": "toolu_fake", "name": self.tool, "input": {}}
        start = {"type": "content_block_start", "index": 0, "content_block": block}
        return sse(start, "content_block_start") + sse({"type": "ping"}, "ping")

    def delta(self, text: str) -> bytes:
        delta = (
            {"type": "input_json_delta", "partial_json": text}
            if self.tool
            else {"type": "text_delta", "text": text}
        )
        return sse(
            {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
        )

    def closing(self, stop_reason: str, output_tokens: int) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        return (
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + sse(delta, "message_delta")
            + sse({"type": "message_stop"}, "message_stop")
        )
