"""One attempt: ask each provider once, in order, and fall through to the next on
any failure (429, 5xx, timeout, connection error, an answer that stays invalid
after the one repair round). The error that ends the attempt names every cause."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from loguru import logger

from listener.course_schema import Course, SchemaValidationError, parse_course
from listener.errors import GenerationError
from listener.providers.base import CoursePrompt, CourseProvider, Media, MediaProvider, Usage
from listener.providers.base import describe as describe_error

T = TypeVar("T")


@dataclass
class Generated:
    provider: str
    model: str
    duration_ms: float
    usage: Usage = field(default_factory=Usage)
    fallbacks: list[str] = field(default_factory=list)  # "openai: HTTP 429 rate limited"
    repairs: int = 0


async def _call(call: Awaitable[T], per_call_s: float) -> T:
    # The SDK timeout bounds each network wait; this bounds the whole call.
    async with asyncio.timeout(per_call_s):
        return await call


async def generate_course(
    chain: list[CourseProvider], prompt: CoursePrompt, per_call_s: float, secrets: list[str]
) -> tuple[Course, Generated]:
    causes: list[str] = []
    t0 = time.perf_counter()
    all_schema = True
    for provider in chain:
        usage = Usage()
        repairs = 0
        try:
            answer = await _call(provider.course(prompt), per_call_s)
            usage.add(answer.usage)
            try:
                course = parse_course(answer.text, prompt.params)
            except SchemaValidationError as exc:
                repairs = 1
                logger.bind(action="course_repair", provider=provider.name).info(
                    "invalid course answer, asking once more: {}", exc.args[0]
                )
                fixed = dataclasses.replace(prompt, repair=(answer.text, exc.args[0]))
                answer = await _call(provider.course(fixed), per_call_s)
                usage.add(answer.usage)
                course = parse_course(answer.text, prompt.params)
        except Exception as exc:
            cause = describe_error(exc, per_call_s, secrets)
            all_schema = all_schema and isinstance(exc, SchemaValidationError)
            causes.append(f"{provider.name}: {cause}")
            logger.bind(action="provider_failed", provider=provider.name).warning(
                "course provider failed: {}", cause
            )
            continue
        ms = round((time.perf_counter() - t0) * 1000, 3)
        return course, Generated(provider.name, answer.model, ms, usage, causes, repairs)
    if all_schema:  # the runbook's "Schema validation failed", said once
        detail = "; ".join(c.replace("Schema validation failed: ", "", 1) for c in causes)
        raise GenerationError(f"Schema validation failed: {detail}")
    raise GenerationError("Course generation failed: " + "; ".join(causes))


async def generate_media(
    chain: list[MediaProvider],
    make: Callable[[MediaProvider], Awaitable[Media]],
    per_call_s: float,
    secrets: list[str],
) -> tuple[Media, Generated]:
    causes: list[str] = []
    t0 = time.perf_counter()
    for provider in chain:
        try:
            media = await _call(make(provider), per_call_s)
        except Exception as exc:
            cause = describe_error(exc, per_call_s, secrets)
            causes.append(f"{provider.name}: {cause}")
            logger.bind(action="provider_failed", provider=provider.name).warning(
                "media provider failed: {}", cause
            )
            continue
        ms = round((time.perf_counter() - t0) * 1000, 3)
        return media, Generated(provider.name, media.model, ms, media.usage, causes)
    raise GenerationError("Media generation failed: " + "; ".join(causes))
