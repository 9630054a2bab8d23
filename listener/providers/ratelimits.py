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

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Limit:
    """One limit as an answer stated it (None: not stated, or not readable)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None  # seconds from when the call was sent until it is full


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
        """The window the limits refill over, from the kind furthest from full
        (whose reset time rounds least): limit * reset / used, as the providers
        refill their buckets continuously. None when no kind says it."""
        best: tuple[float, float] | None = None
        for v in self.kinds.values():
            if v.limit is None or v.remaining is None or v.reset is None or v.reset <= 0:
                continue
            used = v.limit - v.remaining
            if used <= 0:
                continue
            estimate = v.limit * v.reset / used
            if best is None or used / v.limit > best[0]:
                best = (used / v.limit, estimate)
        if best is None:
            return None
        return min(WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, best[1]))


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
    return Limit(
        _count(_get(headers, f"x-ratelimit-limit-{suffix}")),
        _count(_get(headers, f"x-ratelimit-remaining-{suffix}")),
        duration(_get(headers, f"x-ratelimit-reset-{suffix}")),
    )


def _anthropic(headers: Mapping[str, str], suffix: str, sent_at: float) -> Limit:
    name = f"anthropic-ratelimit-{suffix}"
    reset = timestamp(_get(headers, f"{name}-reset"))
    seconds = None
    if reset is not None:
        seconds = max(0.0, reset - sent_at)
        if seconds > MAX_RESET_SECONDS:
            seconds = None
    return Limit(
        _count(_get(headers, f"{name}-limit")), _count(_get(headers, f"{name}-remaining")), seconds
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
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 40:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and 0 <= seconds <= MAX_RESET_SECONDS else None
    total, at = 0.0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != at:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        at = m.end()
    if at != len(text) or at == 0 or total > MAX_RESET_SECONDS:
        return None
    return total


def timestamp(value: str | None) -> float | None:
    """An RFC 3339 time (`2026-12-06T10:00:05Z`, with fractions or an offset)
    as time.time(); None for anything else, and for a time without a zone."""
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
    return when.timestamp()


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
