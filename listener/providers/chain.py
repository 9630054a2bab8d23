"""One attempt: ask each provider of the chain once, in order, past those whose
breaker is open or whose quota has no room for the call (each call is reserved
before it goes and settled after it: quota.py), and decide what the failures
mean (docs/generation.md):

- unwell (5xx, 429/529, a timeout, a connection error): the breaker counts it;
  the next provider;
- auth (401/403, 404 unknown model): the breaker opens for long (and the
  provider_auth alert fires); the next provider;
- refused (400, context length, a refusal, a content-policy block) and invalid
  (not a course after the one repair round): the next provider.

When none answered: every one refused -> RequestRefused (the dead letter at once,
retrying cannot help); every one refused, is now open or out of quota ->
ProvidersUnavailable (the job waits, no attempt counted); otherwise
GenerationError (a failed attempt) naming every cause. Each job's chain is noted
for the claim gate (gate.py), which then claims no more jobs than can go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from loguru import logger

from listener import tracing
from listener.course_schema import Course, SchemaValidationError, parse_course
from listener.errors import GenerationError, ProvidersUnavailable, RequestRefused
from listener.jobs import work_begins
from listener.providers import quota, ratelimits
from listener.providers.base import (
    HEADERS_HEARD,
    Answer,
    Classified,
    CoursePrompt,
    CourseProvider,
    Failure,
    Media,
    MediaProvider,
    Refused,
    TextSink,
    Usage,
    classify,
)
from listener.providers.base import describe as describe_error
from listener.providers.breaker import Breakers
from listener.providers.gate import ClaimGate, Stop
from listener.providers.meter import Meter, Payer
from listener.providers.quota import Grant, Quotas, Refusal
from listener.providers.ratelimits import RateLimits
from listener.settings import Settings

R = TypeVar("R")
T = TypeVar("T")
# An answer's rate limits, what the provider counted, what it gave back since.
Counted = tuple[RateLimits, quota.Cost, list[float] | None]
V = TypeVar("V")
P = TypeVar("P", CourseProvider, MediaProvider)
MIN_STREAM_RATE = 20.0  # tokens a second: slower than any live model streams
UNGUARDED = frozenset({"placeholder"})  # local, never unwell: no breaker
MEDIA_OP = "generate_content"  # a media call's GenAI operation (a course's: chat)
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
    def __init__(
        self, settings: Settings, breakers: Breakers, meter: Meter, quotas: Quotas | None = None
    ) -> None:
        self.per_call = settings.ai_timeout_seconds
        # A streamed answer is cut when it stalls (its first-token and idle clocks,
        # each within AI_TIMEOUT_SECONDS), not for being long: as a whole it may run
        # as long as its output at the slowest rate a live model streams.
        self.stream_cap = max(self.per_call, settings.ai_max_output_tokens / MIN_STREAM_RATE)
        self.retry_after_cap = settings.provider_retry_after_max_seconds
        self.max_tokens = settings.ai_max_output_tokens
        self.secrets = settings.secrets()
        self.breakers = breakers
        self.meter = meter
        self.quotas = quotas or Quotas(None, settings)
        self.gate = ClaimGate(breakers, self.quotas)  # the claim loop's view of the lanes
        self._early: set[asyncio.Task[None]] = set()  # learning calls' early settles

    async def course(
        self,
        providers: Sequence[CourseProvider],
        prompt: CoursePrompt,
        job: Payer | None = None,
        reader: Callable[[], TextSink | None] | None = None,
    ) -> tuple[Course, Generated]:
        """`job`: whom each call is charged to (the budget's spend); `reader`: a
        fresh sink for each call's streamed text (the job's progress)."""

        def sink() -> TextSink | None:
            return reader() if reader is not None else None

        def plan(p: CourseProvider, ask: CoursePrompt = prompt) -> Stop:
            cost = quota.estimate(_prompt_chars(ask), self.max_tokens)
            # A batch's answer (listener/batches/) was paid for in the batch: no call.
            guarded = p.name not in UNGUARDED and not getattr(p, "answered", False)
            return Stop(p.name, p.model, cost, guarded)

        async def ask(p: CourseProvider, grant: Grant | None) -> _Made[Course]:
            usage = Usage()
            answer = await self._answer(
                p, plan(p), grant, lambda: p.course(prompt, sink()), usage, job
            )
            try:
                return _Made(parse_course(answer.text, prompt.params), answer.model, usage)
            except SchemaValidationError as exc:
                problem = str(exc.args[0])
            logger.bind(action="course_repair", provider=p.name).info(
                "invalid course answer, asking once more: {}", problem
            )
            fixed = dataclasses.replace(prompt, repair=(answer.text, problem))
            again = plan(p, fixed)
            answer = await self._answer(p, again, None, lambda: p.course(fixed, sink()), usage, job)
            return _Made(parse_course(answer.text, prompt.params), answer.model, usage, 1)

        # A probe's lease covers the answer and its repair round.
        return await self._run(providers, plan, ask, "Course", 2 * self.per_call + 5, job)

    async def media(
        self,
        providers: Sequence[MediaProvider],
        make: Callable[[MediaProvider], Awaitable[Media]],
        job: Payer | None = None,
        model_of: Callable[[MediaProvider], str] | None = None,
    ) -> tuple[Media, Generated]:
        """`model_of`: the model a provider makes this media with (its quota's)."""

        def plan(p: MediaProvider) -> Stop:
            model = model_of(p) if model_of else p.name
            # A batch's image (listener/batches/) was paid for in the batch: no call.
            guarded = p.name not in UNGUARDED and not getattr(p, "answered", False)
            return Stop(p.name, model, quota.MEDIA, guarded)

        async def ask(p: MediaProvider, grant: Grant | None) -> _Made[Media]:
            media = await self._call(plan(p), grant, lambda: make(p), _media_counted, MEDIA_OP)
            await self.meter.charge(job, p.name, media.model, media.usage)
            return _Made(media, media.model, media.usage)

        return await self._run(providers, plan, ask, "Media", self.per_call + 5, job)

    async def _answer(
        self,
        p: CourseProvider,
        stop: Stop,
        grant: Grant | None,
        call: Callable[[], Awaitable[Answer]],
        usage: Usage,
        job: Payer | None,
    ) -> Answer:
        def counted(answer: Answer) -> Counted:
            used = answer.usage
            cost = quota.charged(p.name, used, self.max_tokens)
            return answer.limits, cost, quota.returned(p.name, used, self.max_tokens)

        try:
            answer = await self._call(stop, grant, call, counted, cap=self.stream_cap)
        except Refused as exc:
            await self.meter.charge(job, p.name, p.model, exc.usage)
            raise
        await self.meter.charge(job, p.name, answer.model, answer.usage)
        usage.add(answer.usage)
        return answer

    async def _call(
        self,
        stop: Stop,
        grant: Grant | None,
        call: Callable[[], Awaitable[R]],
        counted: Callable[[R], Counted],
        operation: str = "chat",
        cap: float | None = None,
    ) -> R:
        """One provider call under its quota: reserved (unless `grant` is the
        reservation made for it already), bounded as a whole by `cap` (a streamed
        answer's) or AI_TIMEOUT_SECONDS, settled from its answer or its error; in its
        span while tracing is on."""
        if grant is None and stop.guarded:
            grant = await self._reserve_waiting(stop)
        work_begins()
        sent = time.time()
        left = [grant]  # the grant still to settle at the end (None: settled early)
        early: list[asyncio.Task[None]] = []  # the settle from the stream's headers, once

        def heard(limits: RateLimits) -> None:
            # A learning call's headers, at the stream's start: the model's limits
            # are known now, so the other calls need not wait for this one's end.
            learner = left[0]
            if learner is None or not limits:
                return
            left[0] = None
            task = asyncio.create_task(
                self.quotas.settle(learner, counted=None, limits=limits, sent_at=sent, heard=True)
            )
            early.append(task)
            self._early.add(task)
            task.add_done_callback(self._early.discard)

        async def bounded() -> R:
            # The SDK timeout bounds each network wait; this bounds the whole call.
            async with asyncio.timeout(cap or self.per_call):
                return await call()

        hook = HEADERS_HEARD.set(heard if grant is not None and grant.learning else None)
        try:
            if tracing.on:
                result = await tracing.provider_call(stop.provider, stop.model, operation, bounded)
            else:
                result = await bounded()
        except BaseException as exc:
            used = getattr(exc, "usage", None)  # a refusal's: billed
            self.meter.observe(operation, stop.provider, stop.model, time.time() - sent, used)
            if left[0] is not None:
                await asyncio.shield(self._settle_failed(left[0], exc, sent))
            raise
        finally:
            HEADERS_HEARD.reset(hook)
        self.meter.observe(
            operation, stop.provider, stop.model, time.time() - sent, getattr(result, "usage", None)
        )
        if early and grant is not None:  # what the provider gave back since its headers
            await asyncio.shield(early[0])  # after them, not before (Anthropic's output)
            await self.quotas.give_back_returned(grant.key, counted(result)[2])
        grant = left[0]
        if grant is not None:
            limits, cost, back = counted(result)
            await self.quotas.settle(
                grant, counted=cost, limits=limits, sent_at=sent, heard=True, returned=back
            )
        return result

    async def _settle_failed(self, grant: Grant, exc: BaseException, sent: float) -> None:
        if isinstance(exc, Refused):  # an answer: the provider counted its input at least
            limits = exc.limits
            await self.quotas.settle(grant, counted=None, limits=limits, sent_at=sent, heard=True)
            return
        response = getattr(exc, "response", None)
        status = getattr(exc, "status_code", None)
        limits = ratelimits.parse(getattr(response, "headers", None), sent)
        await self.quotas.settle(
            grant,
            counted=None,
            limits=limits,
            sent_at=sent,
            heard=response is not None,
            limited=status == 429,
        )

    async def _reserve_waiting(self, stop: Stop) -> Grant:
        """A call in the middle of an attempt (the repair round): it waits here for
        its quota, for at most AI_TIMEOUT_SECONDS, rather than lose the first."""
        deadline = time.monotonic() + self.per_call
        while True:
            got = await self.quotas.reserve(stop.key, stop.cost)
            if isinstance(got, Grant):
                return got
            if got.too_big or time.monotonic() + got.wait > deadline:
                raise _QuotaRefused(got)
            await asyncio.sleep(got.wait)

    async def _run(
        self,
        providers: Sequence[P],
        plan: Callable[[P], Stop],
        ask: Callable[[P, Grant | None], Awaitable[_Made[T]]],
        what: str,
        lease: float,
        job: Payer | None,
    ) -> tuple[T, Generated]:
        causes: list[str] = []
        outcomes: list[str] = []  # a Failure, or LATER
        waits: list[float] = []
        quota_only = True  # every LATER is a quota's
        t0 = time.perf_counter()
        lane = [plan(p) for p in providers]
        if job is not None and not any(getattr(p, "answered", False) for p in providers):
            # (A batch's answer, read without a call, is not what the table's jobs ask.)
            self.gate.note(job.lane, lane)
        for p, stop in zip(providers, lane, strict=True):
            grant: Grant | None = None
            if (ready := getattr(p, "ready", None)) is not None:
                # A client made at its first use (its SDK imported): before any
                # reservation or probe is held, and not inside the call's time.
                try:
                    await ready()
                except Exception as exc:  # not installed, say: the next provider's turn
                    outcomes.append(self._failed(p.name, exc, what, causes)[0].failure)
                    continue
            if stop.guarded:
                seen = await self.breakers.peek(p.name)
                got = await self.quotas.reserve(stop.key, stop.cost) if seen.call else None
                if isinstance(got, Refusal):
                    causes.append(f"{p.name}: {got.reason}")
                    if got.too_big:
                        outcomes.append(Failure.REFUSED)
                    else:
                        outcomes.append(LATER)
                        waits.append(min(got.wait, quota.QUOTA_DUE_SECONDS))
                    continue
                grant = got
                admit = await self.breakers.admit(p.name, lease) if seen.call else seen
                if not admit.call:
                    if grant is not None:
                        await self.quotas.release(grant)
                    causes.append(f"{p.name}: {admit.reason}")
                    outcomes.append(LATER)
                    waits.append(admit.wait)
                    quota_only = False
                    continue
            try:
                made = await ask(p, grant)
            except _QuotaRefused as exc:  # the repair round's quota: later, as for the first
                if stop.guarded:
                    await self.breakers.succeeded(p.name)  # its first call was answered
                causes.append(f"{p.name}: {exc.refusal.reason}")
                outcomes.append(Failure.REFUSED if exc.refusal.too_big else LATER)
                waits.append(min(exc.refusal.wait, quota.QUOTA_DUE_SECONDS))
                continue
            except Exception as exc:
                c, cause = self._failed(p.name, exc, what, causes)
                wait = await self.breakers.record(p.name, c, cause) if stop.guarded else None
                if wait is not None:
                    outcomes.append(LATER)
                    waits.append(wait)
                    quota_only = False
                else:
                    outcomes.append(c.failure)
                continue
            if stop.guarded:
                await self.breakers.succeeded(p.name)
            ms = round((time.perf_counter() - t0) * 1000, 3)
            gen = Generated(p.name, made.model, ms, made.usage, causes, made.repairs)
            return made.value, gen
        raise verdict(what, causes, outcomes, waits, quota_only)

    def _failed(
        self, name: str, exc: BaseException, what: str, causes: list[str]
    ) -> tuple[Classified, str]:
        """A provider's failure: classified, named among the causes, logged."""
        c = classify(exc, self.retry_after_cap)
        cause = describe_error(exc, self.per_call, self.secrets)
        causes.append(f"{name}: {cause}")
        logger.bind(action="provider_failed", provider=name, failure=c.failure).warning(
            "{} provider failed: {}", what.lower(), cause
        )
        return c, cause


class _QuotaRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


def _prompt_chars(prompt: CoursePrompt) -> int:
    """The size of what a course request sends: the instructions, the request, the
    schema, and the repair round's previous answer and problem."""
    size = len(prompt.system) + len(prompt.user) + len(json.dumps(prompt.schema))
    if prompt.repair:
        size += sum(len(part) for part in prompt.repair) + 200  # and the follow-up's text
    return size


def _media_counted(media: Media) -> Counted:
    return media.limits, quota.MEDIA, None


def verdict(
    what: str, causes: list[str], outcomes: list[str], waits: list[float], quota_only: bool = False
) -> GenerationError | RequestRefused:
    """The error that ends an attempt where no provider made the result."""
    detail = "; ".join(causes)
    refused = outcomes.count(Failure.REFUSED)
    later = outcomes.count(LATER)
    if outcomes and refused == len(outcomes):
        return RequestRefused(f"Request refused by every provider: {detail}")
    if later and later + refused == len(outcomes):
        return ProvidersUnavailable(f"Providers unavailable: {detail}", min(waits), quota_only)
    if outcomes and outcomes.count(Failure.INVALID) == len(outcomes):
        # the runbook's "Schema validation failed", said once
        return GenerationError(
            "Schema validation failed: "
            + "; ".join(c.replace("Schema validation failed: ", "", 1) for c in causes)
        )
    return GenerationError(f"{what} generation failed: {detail}")
