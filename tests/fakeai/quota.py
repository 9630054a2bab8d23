"""Provider quotas: requests and tokens per minute, per model, as token buckets.

Both providers describe their limits as buckets whose capacity is replenished
continuously up to the limit, not counters reset at fixed times. Each (provider,
model) has one bucket per limit, holding up to `limit` and refilled at
`limit / window` per second (`window` is 60 s for the real thing; tests shrink it,
and the "per minute" figures in the headers are then per window).

A request is charged as its provider says it counts:
- OpenAI (rpm, tpm): one request, and its prompt tokens plus its max_tokens
  (max_completion_tokens) against TPM, all when it arrives.
- Anthropic (rpm, itpm, otpm): one request, and the input tokens that count
  (input_tokens + cache_creation_input_tokens; cache reads do not) against ITPM
  when it starts; max_tokens held against OTPM at the start as the estimate, and
  settled to the output tokens produced when the answer ends.
A request is admitted only if every bucket it draws on holds its cost, and then
charged; else it is refused with nothing charged and the time until it would fit.

Two conditions a deployment meets and a benchmark can ask for (bench/ai):
- `foreign`: another application on the same key takes that share of every
  bucket's refill, so this client gets the rest. The headers state the key's
  whole limit, what remains after the other's use, and the reset as the
  provider computes it: the time to refill at the key's whole rate (it cannot
  know what the other will take), so a client tells the other's use from the
  remaining it is told, not from the reset.
- `raise_at` / `raise_by`: the provider raises the key's limits by `raise_by`
  that many seconds after the quotas start (a move up a usage tier); the
  buckets keep their level and refill at the new rate from then on.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

KINDS = {
    "openai": ("requests", "tokens"),
    "anthropic": ("requests", "input_tokens", "output_tokens"),
}


@dataclass(frozen=True)
class Limits:
    """Per model and per `window` seconds (tier-4-like defaults, never reached by a test
    that does not mean to)."""

    rpm: int = 10_000
    tpm: int = 10_000_000  # OpenAI: prompt + max_tokens
    itpm: int = 4_000_000  # Anthropic: input tokens
    otpm: int = 800_000  # Anthropic: output tokens
    window: float = 60.0
    foreign: float = 0.0  # the share of each refill another application of the key takes
    raise_at: float = 0.0  # seconds after the start when the limits rise (0: never)
    raise_by: float = 1.0  # ... by this factor

    def __post_init__(self) -> None:
        if not 0 <= self.foreign < 1:
            raise ValueError(f"foreign share must be in [0, 1), not {self.foreign}")
        if self.raise_at < 0 or self.raise_by <= 0:
            raise ValueError("raise_at must be >= 0 and raise_by > 0")

    def of(self, kind: str) -> int:
        return {
            "requests": self.rpm,
            "tokens": self.tpm,
            "input_tokens": self.itpm,
            "output_tokens": self.otpm,
        }[kind]


class Bucket:
    def __init__(self, limit: int, window: float, now: float, share: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self.share = share  # of the refill this client gets (the rest is another's)
        self.level = float(limit)
        self.at = now

    @property
    def key_rate(self) -> float:
        """The key's whole refill a second, as the provider states it."""
        return self.limit / self.window

    def rescale(self, limit: int, now: float) -> None:
        """The key's limit changes at `now`: refilled until then at the old rate."""
        self.refill(now)
        self.limit = limit

    def refill(self, now: float) -> None:
        gained = (now - self.at) * self.share * self.key_rate
        self.level = min(self.limit, self.level + gained)
        self.at = now

    def wait(self, cost: int) -> float:
        """Seconds until the bucket holds `cost` at the key's whole refill rate, as
        the provider tells it in retry-after (0: now; inf: never)."""
        if cost <= self.level:
            return 0.0
        return math.inf if cost > self.limit else (cost - self.level) / self.key_rate

    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    def full_in(self) -> float:
        """The reset header: seconds until full at the key's whole refill rate."""
        return max(0.0, (self.limit - self.level) / self.key_rate)


@dataclass
class Limited:
    """A request refused for its quota: which limit, and when it would fit."""

    provider: str
    model: str
    kind: str
    limit: int
    cost: int
    retry_after: float
    at: float  # time.time()


class Quotas:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.buckets: dict[tuple[str, str, str], Bucket] = {}
        self.started = time.monotonic()
        self.raised = False  # the limits are raise_by times the stated ones

    def limit(self, kind: str) -> int:
        return round(self.limits.of(kind) * (self.limits.raise_by if self.raised else 1.0))

    def _bucket(self, provider: str, model: str, kind: str, now: float) -> Bucket:
        lim = self.limits
        if lim.raise_at and not self.raised and now >= self.started + lim.raise_at:
            self.raised = True
            at = self.started + lim.raise_at
            for (_, _, k), b in self.buckets.items():
                b.rescale(self.limit(k), at)
        key = (provider, model, kind)
        if key not in self.buckets:
            self.buckets[key] = Bucket(self.limit(kind), lim.window, now, 1.0 - lim.foreign)
        b = self.buckets[key]
        b.refill(now)
        return b

    def admit(self, provider: str, model: str, costs: dict[str, int]) -> Limited | None:
        """Charge `costs` ({kind: n}) if every bucket holds them, else say why not."""
        now = time.monotonic()
        with self.lock:
            buckets = {k: self._bucket(provider, model, k, now) for k in costs}
            waits = {k: b.wait(costs[k]) for k, b in buckets.items()}
            kind = max(waits, key=lambda k: waits[k])
            if waits[kind] > 0:
                # A cost over the limit never fits: come back when the bucket is full.
                wait = waits[kind] if math.isfinite(waits[kind]) else buckets[kind].full_in()
                limit = buckets[kind].limit
                return Limited(provider, model, kind, limit, costs[kind], wait, time.time())
            for k, b in buckets.items():
                b.level -= costs[k]
        return None

    def give_back(self, provider: str, model: str, kind: str, n: int) -> None:
        """Return `n` tokens held by an estimate (Anthropic's OTPM settled at the end)."""
        if n > 0:
            now = time.monotonic()
            with self.lock:
                b = self._bucket(provider, model, kind, now)
                b.level = min(b.limit, b.level + n)

    def headers(self, provider: str, model: str) -> dict[str, str]:
        """The provider's rate-limit headers for `model` as the buckets stand now."""
        now = time.monotonic()
        with self.lock:
            state = {
                k: (b.limit, b.remaining(), b.full_in())
                for k in KINDS[provider]
                for b in [self._bucket(provider, model, k, now)]
            }
        if provider == "openai":
            return {
                f"x-ratelimit-{field}-{kind}": value
                for kind, (limit, remaining, full_in) in state.items()
                for field, value in (
                    ("limit", str(limit)),
                    ("remaining", str(remaining)),
                    ("reset", go_duration(full_in)),
                )
            }
        i, o = state["input_tokens"], state["output_tokens"]
        # -tokens-: the most restrictive limit in effect; without workspace limits,
        # input and output together.
        state["tokens"] = (i[0] + o[0], i[1] + o[1], max(i[2], o[2]))
        wall = time.time()
        out = {}
        for kind, (limit, remaining, full_in) in state.items():
            name = f"anthropic-ratelimit-{kind.replace('_', '-')}"
            out[f"{name}-limit"] = str(limit)
            out[f"{name}-remaining"] = str(remaining)
            out[f"{name}-reset"] = rfc3339(wall + full_in)
        return out


def retry_headers(seconds: float) -> dict[str, str]:
    """`retry-after` in whole seconds (rounded up) and, as both SDKs read first,
    `retry-after-ms`."""
    return {
        "retry-after": str(math.ceil(seconds)),
        "retry-after-ms": str(math.ceil(seconds * 1000)),
    }


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations to the millisecond): 59ms, 1s, 6m0s, 1m30.5s."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    out = (f"{h}h" if h else "") + (f"{m}m" if h or m else "")
    return out + f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def rfc3339(when: float) -> str:
    """Anthropic's reset format: an RFC 3339 UTC time, to the second (rounded up)."""
    return datetime.fromtimestamp(math.ceil(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def limited_body(provider: str, r: Limited) -> dict[str, object]:
    """The provider's 429 body for a quota refusal."""
    if provider == "openai":
        unit = "requests per min (RPM)" if r.kind == "requests" else "tokens per min (TPM)"
        message = (
            f"Rate limit reached for {r.model} in organization org-fake on {unit}: "
            f"Limit {r.limit}, Requested {r.cost}. "
            f"Please try again in {go_duration(r.retry_after)}."
        )
        return {
            "error": {
                "message": message,
                "type": r.kind,
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
    unit = r.kind.replace("_", " ")
    message = (
        f"This request would exceed the rate limit for your organization of "
        f"{r.limit:,} {unit} per minute for {r.model}. Please try again later."
    )
    return {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
