"""One attempt: ask each provider of the chain once, in order, past those whose
breaker is open, and decide what the failures mean (docs/generation.md):

- unwell (5xx, 429/529, a timeout, a connection error): the breaker counts it;
  the next provider;
- auth (401/403, 404 unknown model): the breaker opens for long (and the
  provider_auth alert fires); the next provider;
- refused (400, context length, a refusal, a content-policy block) and invalid
  (not a course after the one repair round): the next provider.

When none answered: every one refused -> RequestRefused (the dead letter at once,
retrying cannot help); every one refused or is now open -> ProvidersUnavailable
(the job waits, no attempt counted); otherwise GenerationError (a failed attempt)
naming every cause.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from loguru import logger

from listener.course_schema import Course, SchemaValidationError, parse_course
from listener.errors import GenerationError, ProvidersUnavailable, RequestRefused
from listener.providers.base import (
    Answer,
    CoursePrompt,
    CourseProvider,
    Failure,
    Media,
    MediaProvider,
    Refused,
    Usage,
    classify,
)
from listener.providers.base import describe as describe_error
from listener.providers.breaker import CALL, Breakers
from listener.providers.meter import Meter, Payer
from listener.settings import Settings

T = TypeVar("T")
V = TypeVar("V")
P = TypeVar("P", CourseProvider, MediaProvider)
UNGUARDED = frozenset({"placeholder"})  # local, never unwell: no breaker
LATER = "later"  # the outcome of a provider skipped or left open: it may work later


@dataclass
class Generated:
    provider: str
    model: str
    duration_ms: float
    usage: Usage = field(default_factory=Usage)
    fallbacks: list[str] = field(default_factory=list)  # "openai: HTTP 429 rate limited"
    repairs: int = 0


@dataclass
class _Made(Generic[V]):
    value: V
    model: str
    usage: Usage
    repairs: int = 0


class Chain:
    def __init__(self, settings: Settings, breakers: Breakers, meter: Meter) -> None:
        self.per_call = settings.ai_timeout_seconds
        self.retry_after_cap = settings.provider_retry_after_max_seconds
        self.secrets = settings.secrets()
        self.breakers = breakers
        self.meter = meter

    async def course(
        self, providers: Sequence[CourseProvider], prompt: CoursePrompt, job: Payer | None = None
    ) -> tuple[Course, Generated]:
        """`job`: whom each call is charged to (the budget's spend)."""

        async def ask(p: CourseProvider) -> _Made[Course]:
            usage = Usage()
            answer = await self._answer(p.name, p.model, p.course(prompt), usage, job)
            try:
                return _Made(parse_course(answer.text, prompt.params), answer.model, usage)
            except SchemaValidationError as exc:
                problem = str(exc.args[0])
            logger.bind(action="course_repair", provider=p.name).info(
                "invalid course answer, asking once more: {}", problem
            )
            fixed = dataclasses.replace(prompt, repair=(answer.text, problem))
            answer = await self._answer(p.name, p.model, p.course(fixed), usage, job)
            return _Made(parse_course(answer.text, prompt.params), answer.model, usage, 1)

        # A probe's lease covers the answer and its repair round.
        return await self._run(providers, ask, "Course", lease=2 * self.per_call + 5)

    async def media(
        self,
        providers: Sequence[MediaProvider],
        make: Callable[[MediaProvider], Awaitable[Media]],
        job: Payer | None = None,
    ) -> tuple[Media, Generated]:
        async def ask(p: MediaProvider) -> _Made[Media]:
            async with asyncio.timeout(self.per_call):
                media = await make(p)
            await self.meter.charge(job, p.name, media.model, media.usage)
            return _Made(media, media.model, media.usage)

        return await self._run(providers, ask, "Media", lease=self.per_call + 5)

    async def _answer(
        self, name: str, model: str, call: Awaitable[Answer], usage: Usage, job: Payer | None
    ) -> Answer:
        try:
            # The SDK timeout bounds each network wait; this bounds the whole call.
            async with asyncio.timeout(self.per_call):
                answer = await call
        except Refused as exc:
            await self.meter.charge(job, name, model, exc.usage)
            raise
        await self.meter.charge(job, name, answer.model, answer.usage)
        usage.add(answer.usage)
        return answer

    async def _run(
        self,
        providers: Sequence[P],
        ask: Callable[[P], Awaitable[_Made[T]]],
        what: str,
        lease: float,
    ) -> tuple[T, Generated]:
        causes: list[str] = []
        outcomes: list[str] = []  # a Failure, or LATER
        waits: list[float] = []
        t0 = time.perf_counter()
        for p in providers:
            guarded = p.name not in UNGUARDED
            admit = await self.breakers.admit(p.name, lease) if guarded else CALL
            if not admit.call:
                causes.append(f"{p.name}: {admit.reason}")
                outcomes.append(LATER)
                waits.append(admit.wait)
                continue
            try:
                made = await ask(p)
            except Exception as exc:
                c = classify(exc, self.retry_after_cap)
                cause = describe_error(exc, self.per_call, self.secrets)
                causes.append(f"{p.name}: {cause}")
                logger.bind(action="provider_failed", provider=p.name, failure=c.failure).warning(
                    "{} provider failed: {}", what.lower(), cause
                )
                wait = await self.breakers.record(p.name, c, cause) if guarded else None
                if wait is not None:
                    outcomes.append(LATER)
                    waits.append(wait)
                else:
                    outcomes.append(c.failure)
                continue
            if guarded:
                await self.breakers.succeeded(p.name)
            ms = round((time.perf_counter() - t0) * 1000, 3)
            gen = Generated(p.name, made.model, ms, made.usage, causes, made.repairs)
            return made.value, gen
        raise verdict(what, causes, outcomes, waits)


def verdict(
    what: str, causes: list[str], outcomes: list[str], waits: list[float]
) -> GenerationError | RequestRefused:
    """The error that ends an attempt where no provider made the result."""
    detail = "; ".join(causes)
    refused = outcomes.count(Failure.REFUSED)
    later = outcomes.count(LATER)
    if outcomes and refused == len(outcomes):
        return RequestRefused(f"Request refused by every provider: {detail}")
    if later and later + refused == len(outcomes):
        return ProvidersUnavailable(f"Providers unavailable: {detail}", min(waits))
    if outcomes and outcomes.count(Failure.INVALID) == len(outcomes):
        # the runbook's "Schema validation failed", said once
        return GenerationError(
            "Schema validation failed: "
            + "; ".join(c.replace("Schema validation failed: ", "", 1) for c in causes)
        )
    return GenerationError(f"{what} generation failed: {detail}")
