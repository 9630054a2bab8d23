"""The rate-limit headers both providers send with every answer, 429s included.

OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, the resets as
Go durations (`6m0s`, `1s`, `59ms`, `1m30.5s`): the time until that limit is
full again. Anthropic: `anthropic-ratelimit-{requests,input-tokens,
output-tokens,tokens}-{limit,remaining,reset}`, the resets as RFC 3339 times
(when that limit is full again). Both: `retry-after` (seconds or an HTTP date)
and `retry-after-ms`.

What a header does not say, or says in a form we cannot read, is left out:
a malformed value never stops a call. Kinds are the quota's (listener.providers.quota):
requests, tokens, input_tokens, output_tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

KINDS = ("requests", "tokens", "input_tokens", "output_tokens")
MAX_VALUE = 10**12  # larger than any real limit: a value beyond it is not one
MAX_RESET_SECONDS = 86_400.0  # a reset further away than a day is not a per-minute limit
# The window the providers' limits are per (the real ones: a minute); learned from
# the resets (a test's fake may shrink it), never beyond these bounds.
WINDOW_SECONDS = 60.0
MIN_WINDOW_SECONDS = 1.0

# Go's units; microseconds as "us", the micro sign (U+00B5) or the Greek mu (U+03BC).
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(_NUMBER + "(h|ms|us|\u00b5s|\u03bcs|ns|m|s)", re.ASCII)
_BARE_NUMBER = re.compile(_NUMBER, re.ASCII)
_FRACTION = re.compile(r":\d\d\.(\d+)", re.ASCII)  # of an RFC 3339 time's seconds
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "ns": 1e-9}
_UNIT |= dict.fromkeys(("us", "\u00b5s", "\u03bcs"), 1e-6)


@dataclass(frozen=True)
class Limit:
    """One limit as an answer stated it (None: not stated, or not readable)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None  # seconds from when the call was sent until it is full
    # The reset's last written digit, in seconds (1 for `6m0s` or a time to the
    # second, 0.001 for `59ms`): how far off it may be. Not part of what was stated.
    precision: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class RateLimits:
    """The limits an answer stated, by kind."""

    kinds: dict[str, Limit] = field(default_factory=dict)
    retry_after: float | None = None

    def __bool__(self) -> bool:
        return any(v.limit is not None or v.remaining is not None for v in self.kinds.values())

    def limits(self) -> list[int | None]:
        return [self.kinds.get(k, Limit()).limit for k in KINDS]

    def remaining(self) -> list[int | None]:
        return [self.kinds.get(k, Limit()).remaining for k in KINDS]

    def window(self) -> float | None:
        """The window the limits refill over (window_read: its seconds)."""
        read = self.window_read()
        return None if read is None else read.seconds

    def window_read(self) -> WindowRead | None:
        """The window the limits refill over: limit * reset / used, as the
        providers refill their buckets continuously. None when no kind says it.

        Of the kinds that say it, the one whose figures are the most exact: a
        remaining count is a whole number (a bucket refilled to 3.5 says 3), so
        `used` may be one too many, and a reset is only as exact as its last
        digit. A kind with 1 of 4 requests used, whose bucket was a fraction
        short, would give a window a quarter too short or worse; beside it, the
        tokens kind of the same answer, with a thousand used, gives it exactly."""
        best: WindowRead | None = None
        for v in self.kinds.values():
            if v.limit is None or v.remaining is None or v.reset is None or v.reset <= 0:
                continue
            used = v.limit - v.remaining
            if used <= 0:
                continue
            # A reset no longer than its last digit may be any fraction of it
            # (`1ms` for 0.2 ms): it says nothing of the window.
            slack = v.reset - v.precision
            error = 1.0 / used + (v.precision / slack if slack > 0 else math.inf)
            if best is None or error < best.error:
                seconds = min(WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, v.limit * v.reset / used))
                best = WindowRead(seconds, error)
        return best


@dataclass(frozen=True)
class WindowRead:
    """A window read from an answer, and how far off it may be, relative: about
    1 for one request used (the bucket may have been most of one short of what
    its whole count says), a quarter for four; infinite for a reset no longer
    than its last digit."""

    seconds: float
    error: float


def parse(headers: Mapping[str, str] | None, sent_at: float) -> RateLimits:
    """The rate limits in `headers` (either provider's; case-insensitive
    mappings such as httpx.Headers, or a plain dict of lower-case names).
    `sent_at`: time.time() when the call was sent, the reference of Anthropic's
    reset times (a reset measured from there is never shorter than the truth).
    Never raises: what cannot be read is left out."""
    if headers is None:
        return RateLimits()
    kinds: dict[str, Limit] = {}
    for kind in ("requests", "input_tokens", "output_tokens", "tokens"):
        suffix = kind.replace("_", "-")
        found = _openai(headers, suffix) if kind in ("requests", "tokens") else Limit()
        if found == Limit():
            found = _anthropic(headers, suffix, sent_at)
            # Anthropic's "tokens" is the most restrictive limit in effect, input
            # and output together: beside those two it says nothing more.
            if kind == "tokens" and ("input_tokens" in kinds or "output_tokens" in kinds):
                found = Limit()
        if found != Limit():
            kinds[kind] = found
    return RateLimits(kinds, retry_after(headers))


def _openai(headers: Mapping[str, str], suffix: str) -> Limit:
    seconds, precision = _duration(_get(headers, f"x-ratelimit-reset-{suffix}")) or (None, 0.0)
    return Limit(
        _count(_get(headers, f"x-ratelimit-limit-{suffix}")),
        _count(_get(headers, f"x-ratelimit-remaining-{suffix}")),
        seconds,
        precision=precision,
    )


def _anthropic(headers: Mapping[str, str], suffix: str, sent_at: float) -> Limit:
    name = f"anthropic-ratelimit-{suffix}"
    reset, precision = _timestamp(_get(headers, f"{name}-reset")) or (None, 0.0)
    seconds = None
    if reset is not None:
        seconds = max(0.0, reset - sent_at)
        if seconds > MAX_RESET_SECONDS:
            seconds = None
    return Limit(
        _count(_get(headers, f"{name}-limit")),
        _count(_get(headers, f"{name}-remaining")),
        seconds,
        precision=precision,
    )


def _get(headers: Mapping[str, str], name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        return None
    n = int(text)
    return n if n <= MAX_VALUE else None


def duration(value: str | None) -> float | None:
    """A Go duration (`6m0s`, `1s`, `59ms`, `1m30.5s`, `1h2m`, `0s`) in seconds;
    None for anything else (a bare number is taken as seconds)."""
    read = _duration(value)
    return read[0] if read else None


def _duration(value: str | None) -> tuple[float, float] | None:
    """A duration's seconds, and what its last digit is worth in seconds (0.1 for
    `1.4s`, 1 for `6m0s`, 0.001 for `59ms`)."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 40:
        return None
    if _BARE_NUMBER.fullmatch(text):
        seconds = float(text)
        return (seconds, _digit(text, 1.0)) if seconds <= MAX_RESET_SECONDS else None
    total, at, last = 0.0, 0, 1.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != at:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        last = _digit(m.group(1), _UNIT[m.group(2)])
        at = m.end()
    if at != len(text) or at == 0 or total > MAX_RESET_SECONDS:
        return None
    return total, last


def _digit(number: str, unit: float) -> float:
    """What the last digit of `number` (in `unit` seconds) is worth."""
    return unit * 10.0 ** -len(number.partition(".")[2])


def timestamp(value: str | None) -> float | None:
    """An RFC 3339 time (`2026-12-06T10:00:05Z`, with fractions or an offset)
    as time.time(); None for anything else, and for a time without a zone."""
    read = _timestamp(value)
    return read[0] if read else None


def _timestamp(value: str | None) -> tuple[float, float] | None:
    """An RFC 3339 time as time.time(), and what its last digit is worth (1 s,
    or its fraction's)."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 40:
        return None
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    fraction = _FRACTION.search(text)
    return when.timestamp(), _digit(f".{fraction.group(1)}" if fraction else "", 1.0)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, else `retry-after` in seconds (an HTTP date is read by
    base.retry_after for the breaker; here only the plain forms)."""
    ms = _get(headers, "retry-after-ms")
    for value, scale in ((ms, 1e-3), (_get(headers, "retry-after"), 1.0)):
        if value is None:
            continue
        try:
            seconds = float(value.strip()) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and 0 <= seconds <= MAX_RESET_SECONDS:
            return seconds
    return None
