"""What every provider offers, what it answers, and how a failure is told and
classified.

A provider makes one call per method (the SDKs' own retries are off); falling
through to the next provider is the chain's job (listener/providers/chain.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import enum
import json
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from listener import errors, tracing
from listener.course_schema import CourseParams, SchemaValidationError
from listener.errors import scrub as scrub  # the providers scrub with the one scrubber
from listener.providers import ratelimits
from listener.providers.ratelimits import RateLimits

E = TypeVar("E")
# Where a streamed course answer's text goes as it arrives (the progress reader,
# listener/course_stream.py): called with each piece, in order.
TextSink = Callable[[str], None]

# The stream's own clocks, each at most AI_TIMEOUT_SECONDS: the first token must
# come within FIRST_TOKEN_TIMEOUT_SECONDS of the request, and each next one within
# IDLE_TIMEOUT_SECONDS of the one before. A stream that stalls fails as a timeout
# does (unwell: the next provider); one that keeps streaming may run longer than
# AI_TIMEOUT_SECONDS, up to its output at 20 tokens a second (chain.py's
# stream_cap). Internal knobs (a provider's `first_token_timeout` and
# `idle_timeout`), not settings.
FIRST_TOKEN_TIMEOUT_SECONDS = 30.0
# A 429 that names no wait, or none (retry-after: 0), still cools the provider
# down this long for every worker: the call goes later, without an attempt.
RATE_LIMITED_MIN_WAIT = 1.0
IDLE_TIMEOUT_SECONDS = 15.0


# Set by the chain around a call that learns a model's limits (listener/providers/
# chain.py): a streamed answer's rate-limit headers come with its first bytes,
# tens of seconds before its end, and the other calls need not wait for the end.
HEADERS_HEARD: contextvars.ContextVar[Callable[[RateLimits], None] | None] = contextvars.ContextVar(
    "ai_jobs_headers_heard", default=None
)


def headers_heard(limits: RateLimits) -> None:
    """A provider has the answer's headers (its rate limits), the body still to come."""
    hook = HEADERS_HEARD.get()
    if hook is not None:
        hook(limits)


async def open_stream(create: Awaitable[Any], first: float, sent: float) -> tuple[Any, RateLimits]:
    """A streamed call's raw response (`with_raw_response`) once its headers came,
    within `first` seconds, and the rate limits they carry, told to the quota at
    once (headers_heard); the body is the caller's to read, event by event."""
    try:
        async with asyncio.timeout(first):
            raw = await create
    except TimeoutError:
        raise StreamStalled(f"stream stalled: no answer within {first:g}s") from None
    limits = ratelimits.parse(raw.headers, sent)
    headers_heard(limits)  # the quota learns now, not at the stream's end
    return raw, limits


def error_kind(error: Any) -> str:
    """An error event's kind (its `type`, or OpenAI's `code`), short; never its text."""
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        if isinstance(kind, str):
            return kind[:60]
    return "unknown"


class StreamStalled(TimeoutError):
    """A stream sent no token in time: a timeout, said precisely."""


class MalformedStream(Exception):
    """A stream event that could not be read (its data not JSON, not the shape the
    provider documents), or an error event in the middle of the stream: the
    provider is misbehaving, as with a 5xx (unwell)."""


async def stream_events(response: Any) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """A streamed response's server-sent events as (event name, JSON object),
    read straight from the HTTP response (the SDKs' own stream classes build a
    typed model of every event: 4 times the CPU of the whole rest, measured in
    bench/streaming.py). Ends at the body's end or OpenAI's `[DONE]`. Raises
    ValueError on data that is not a JSON object (`watched` makes it a
    MalformedStream)."""
    event, data = "", []
    async for line in response.aiter_lines():
        if line:
            if line[0] == ":":
                continue  # a comment (keep-alive)
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            continue
        if data:
            text = "\n".join(data)
            if text == "[DONE]":
                return
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("an event's data is not a JSON object")
            yield event, doc
        event, data = "", []


def number(value: Any) -> int:
    """A token count from an event (0 when absent or not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


async def watched(
    events: AsyncIterable[E],
    first: float,
    idle: float,
    is_token: Callable[[E], bool],
) -> AsyncGenerator[E, None]:
    """The stream's events, failing with StreamStalled when the first token takes
    longer than `first` seconds or a next one longer than `idle`. Only the wait for
    the next event is timed (never the caller's work between events).

    One timer per stall period, not one per event: a token only moves `due`; the
    timer, when it fires, looks at `due` and either sets itself again for it or,
    the wait still going, expires the stream's timeout (at 500 streams of 75
    tokens a second, a timer per token was a tenth of the worker's CPU)."""
    loop = asyncio.get_running_loop()
    it = aiter(events)
    due, waited, what = loop.time() + first, first, "first token"
    waiting = late = False
    cm: asyncio.Timeout | None = None
    timer: asyncio.TimerHandle | None = None

    def arm(when: float) -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
        timer = loop.call_at(when, check)

    def check() -> None:
        nonlocal late
        now = loop.time()
        if now < due:
            arm(due)
        elif waiting and cm is not None:
            cm.reschedule(now)  # the wait is cancelled: TimeoutError below
        else:
            late = True  # out of time while the caller worked: said at the next wait

    arm(due)
    try:
        async with asyncio.timeout(None) as cm:
            while True:
                if late and loop.time() >= due:
                    raise StreamStalled(f"stream stalled: no {what} within {waited:g}s")
                waiting = True
                try:
                    event = await anext(it)
                except StopAsyncIteration:
                    return
                except ValueError as exc:  # an event that could not be decoded
                    raise MalformedStream(
                        f"malformed stream event ({type(exc).__name__})"
                    ) from None
                finally:
                    waiting = False
                if is_token(event):
                    if tracing.on and what == "first token":
                        tracing.first_token()  # an event on the call's span (listener/tracing.py)
                    due, waited, what = loop.time() + idle, idle, "token"
                    if late or (timer is not None and due < timer.when()):
                        late = False  # the timer set for later than due, or not set
                        arm(due)
                yield event
    except TimeoutError:
        raise StreamStalled(f"stream stalled: no {what} within {waited:g}s") from None
    finally:
        if timer is not None:
            timer.cancel()


@dataclass
class Usage:
    input_tokens: int = 0  # every input token, those read from or written to a cache too
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # None once any part of it is unknown
    cached_input_tokens: int = 0  # read from the provider's prompt cache (cheaper)
    cache_write_tokens: int = 0  # written to it (Anthropic: dearer than plain input)

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_write_tokens += other.cache_write_tokens
        if self.cost_usd is None or other.cost_usd is None:
            self.cost_usd = None
        else:
            self.cost_usd += other.cost_usd


@dataclass(frozen=True)
class CoursePrompt:
    system: str
    user: str
    schema: dict[str, Any]
    # the request itself, for the placeholder, which needs no prose
    subject: str
    course_id: str
    params: CourseParams
    # (the previous answer, what was wrong with it): the one repair round
    repair: tuple[str, str] | None = None


@dataclass
class Answer:
    """A course answer as text (JSON when the provider behaved)."""

    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    limits: RateLimits = field(default_factory=RateLimits)  # the answer's rate-limit headers
    finish_reason: str | None = None  # as the provider said it (stop, length, end_turn, ...)


@dataclass
class Media:
    data: bytes
    ext: str
    content_type: str
    model: str
    usage: Usage = field(default_factory=Usage)
    limits: RateLimits = field(default_factory=RateLimits)


class CourseProvider(Protocol):
    name: str
    model: str

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        """The answer, its text also fed to `sink` piece by piece as it streams."""
        ...

    async def check(self) -> str: ...

    async def aclose(self) -> None: ...


class MediaProvider(Protocol):
    name: str

    def media_model(self, media_type: str) -> str:
        """The model that makes `media_type` (image, audio): its quota's."""
        ...

    async def image(self, prompt: str, size: str) -> Media: ...

    async def speech(self, text: str, voice: str, fmt: str) -> Media: ...


class Refused(Exception):
    """The provider answered, but with a refusal or a content-policy block."""

    def __init__(
        self, message: str, usage: Usage | None = None, limits: RateLimits | None = None
    ) -> None:
        super().__init__(message)
        self.usage = usage or Usage()  # what the refusal cost
        self.limits = limits or RateLimits()  # its answer's rate-limit headers


class Failure(enum.StrEnum):
    """What a failed call says, and so what happens next (docs/generation.md)."""

    UNWELL = "unwell"  # 5xx, 429/529, a timeout, a connection error: counts toward the breaker
    AUTH = "auth"  # 401/403, 404 unknown model, 402: every call would fail alike
    REFUSED = "refused"  # 400/413/422 (context length...), a refusal: this request, not them
    INVALID = "invalid"  # an answer, still not a valid course after the repair round
    OTHER = "other"  # anything else: a failed attempt, the breaker untouched


@dataclass(frozen=True)
class Classified:
    failure: Failure
    retry_after: float | None = None  # seconds the provider asked us to wait (bounded)


def classify(exc: BaseException, retry_after_cap: float) -> Classified:
    if isinstance(exc, SchemaValidationError):
        return Classified(Failure.INVALID)
    if isinstance(exc, Refused):
        return Classified(Failure.REFUSED)
    if isinstance(exc, (TimeoutError, MalformedStream, *_sdk_errors("APITimeoutError"))):
        return Classified(Failure.UNWELL)
    if isinstance(exc, _sdk_errors("APIStatusError")):
        code: int = getattr(exc, "status_code", 0)
        if code in (401, 402, 403, 404):
            return Classified(Failure.AUTH)
        if code in (400, 413, 422):
            return Classified(Failure.REFUSED)
        if code == 429:  # the quota's answer: later, never an attempt's failure
            later = max(retry_after(exc) or 0.0, RATE_LIMITED_MIN_WAIT)
            return Classified(Failure.UNWELL, min(later, retry_after_cap))
        if code in (408, 409) or code >= 500:
            wait = retry_after(exc)
            return Classified(Failure.UNWELL, None if wait is None else min(wait, retry_after_cap))
        return Classified(Failure.OTHER)
    if isinstance(exc, (OSError, *_sdk_errors("APIConnectionError"), *_transport_errors())):
        return Classified(Failure.UNWELL)
    return Classified(Failure.OTHER)


def retry_after(exc: BaseException) -> float | None:
    """`retry-after-ms` (OpenAI, Anthropic), else `retry-after` in seconds or as an
    HTTP date; None when the response names no time."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        if ms := headers.get("retry-after-ms"):
            return max(0.0, float(ms) / 1000)
        if value := headers.get("retry-after"):
            try:
                return max(0.0, float(value))
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def repair_request(problem: str) -> str:
    """The follow-up of the one repair round."""
    return (
        f"That answer is not a valid course: {problem}. "
        "Answer again with only the corrected course as JSON matching the schema."
    )


def _sdk_errors(kind: str) -> tuple[type[BaseException], ...]:
    # An SDK's error exists only once its module is loaded, so look there instead of
    # importing both SDKs (seconds of start-up) into a worker that may use neither.
    # A module still being imported (Anthropic's, in a thread) may not define it
    # yet; it cannot have raised it either.
    found = (getattr(sys.modules.get(name), kind, None) for name in _SDKS)
    return tuple(e for e in found if e is not None)


_SDKS = ("openai", "anthropic")


def sdk_transport(sdk: Any) -> dict[str, Any]:
    """The SDK client's HTTP transport: aiohttp's, as the SDKs offer it
    (`DefaultAioHttpClient`), when installed (the `aiohttp` extra of both SDKs,
    a dependency of this project); else the SDK's default (httpx). At hundreds
    of streams the default's reads cost a third more of the worker's CPU per
    token: each read pauses and resumes the socket's reader (docs/benchmarks.md,
    "Streaming and progress")."""
    client = getattr(sdk, "DefaultAioHttpClient", None)
    if client is None:
        return {}
    try:
        return {"http_client": client()}
    except RuntimeError:  # the SDK's own word for "aiohttp is not installed"
        return {}


def _transport_errors() -> tuple[type[BaseException], ...]:
    # A stream broken off mid-answer raises the HTTP client's own error (the SDKs
    # wrap only the errors of the request, not those of reading a streamed body);
    # the SDKs use httpx or, in their newer versions, httpx2.
    found = (getattr(sys.modules.get(name), "TransportError", None) for name in ("httpx", "httpx2"))
    return tuple(e for e in found if e is not None)


def describe(exc: BaseException, timeout: float, secrets: list[str]) -> str:
    """One short cause for the error message: never a key, never a traceback."""
    if isinstance(exc, SchemaValidationError):
        return scrub(str(exc), secrets)[:300]
    if isinstance(exc, errors.AiJobsError):
        return scrub(exc.message, secrets)[:300]
    if isinstance(exc, Refused):
        return f"refused: {scrub(str(exc), secrets)}"[:300]
    if isinstance(exc, (StreamStalled, MalformedStream)):
        return str(exc)
    if isinstance(exc, (TimeoutError, *_sdk_errors("APITimeoutError"))):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, _sdk_errors("APIStatusError")):
        code: int = getattr(exc, "status_code", 0)
        if code == 429:
            return "HTTP 429 rate limited"
        if code == 529:
            return "HTTP 529 overloaded"
        if code >= 500:
            return f"HTTP {code} server error"
        return f"HTTP {code} {scrub(_status_message(exc), secrets)}"[:200]
    if isinstance(exc, (OSError, *_sdk_errors("APIConnectionError"), *_transport_errors())):
        return "connection error"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {scrub(str(exc), secrets)}"[:200]


def _status_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return type(exc).__name__
