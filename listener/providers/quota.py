"""Provider quotas, shared by every worker through ai_job_provider_quotas (sql/023).

Each provider call is reserved before it goes (`reserve`: a request and the
call's estimated tokens, taken from the model's buckets, or a refusal that says
how long until it fits) and settled from its answer (`settle`: what the estimate
held beyond what the provider counted goes back; the limits, the window and a
lower remaining are learned from the answer's rate-limit headers). The claim
loop takes reservations for the jobs it is about to claim (`take`, through the
claim gate: listener/providers/gate.py); a job's call then uses one of those
(`permits`) instead of a statement of its own. So a call costs one or two
statements, and a job is never claimed for a quota that is spent.

The estimate is what the provider itself holds when the call arrives: the
prompt's tokens (its characters / CHARS_PER_TOKEN, on the high side) and the
request's max_tokens (AI_MAX_OUTPUT_TOKENS). OpenAI counts max_tokens against
TPM whatever the answer's length, Anthropic holds it against OTPM until the
answer ends: a smaller estimate (a running average of real answers, say) would
let calls through that the provider then refuses. The settlement corrects the
prompt's part, and Anthropic's output, from the reported usage.

Without the database (none configured, or unreachable) calls are not held
back here: the provider's 429 and the breakers remain (docs/generation.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.providers.base import Usage
from listener.providers.ratelimits import KINDS, RateLimits
from listener.settings import Settings

CHARS_PER_TOKEN = 3  # English runs near 4 characters a token, JSON nearer 3: the high side
PERMIT_SECONDS = 2.0  # a reservation taken for a claimed job and not used by then goes back
LEARNING_RECHECK_SECONDS = 1.0  # while a first call learns the limits, look again after
# A job put back for its quota is due again within this; the claim gate then holds
# its table's claims for as long as the quota needs (it knows better by then: the
# window learned, reservations given back).
QUOTA_DUE_SECONDS = 1.0
DB_WAIT_SECONDS = 2.0  # a quota statement never holds a call longer than this

Key = tuple[str, str]  # (provider, model)


@dataclass(frozen=True)
class Cost:
    """What one call draws on each kind of a model's quota."""

    requests: float = 1.0
    tokens: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0

    def vector(self) -> list[float]:
        # floats all: psycopg dumps a list of one type only
        return [
            float(x) for x in (self.requests, self.tokens, self.input_tokens, self.output_tokens)
        ]

    def minus(self, other: Cost) -> list[float]:
        return [a - b for a, b in zip(self.vector(), other.vector(), strict=True)]


MEDIA = Cost()  # an image or a speech: one request


def estimate(prompt_chars: int, max_tokens: int) -> Cost:
    """A chat call's cost as the provider holds it on arrival: its prompt, on the
    high side, and its max_tokens."""
    prompt = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    return Cost(1, prompt + max_tokens, prompt, max_tokens)


def charged(provider: str, usage: Usage, max_tokens: int) -> Cost:
    """What the provider counted for an answered chat call. OpenAI: the prompt and
    max_tokens against TPM, whatever the answer's length. Anthropic: the input
    that counts (cache reads do not; usage.input_tokens holds them) and the output
    produced."""
    if provider == "openai":
        prompt = usage.input_tokens
        return Cost(1, prompt + max_tokens, prompt, usage.output_tokens)
    counted = max(0, usage.input_tokens - usage.cached_input_tokens)
    return Cost(1, counted + usage.output_tokens, counted, usage.output_tokens)


def returned(provider: str, usage: Usage, max_tokens: int) -> list[float]:
    """What the provider gave back of its own hold after its headers were written
    (they describe the quota as the call was admitted): Anthropic's output
    estimate, max_tokens less the output produced, at the answer's end."""
    if provider != "anthropic":
        return [0.0] * 4
    back = float(max(0, max_tokens - usage.output_tokens))
    return [0.0, back, 0.0, back]


@dataclass
class Grant:
    """A call that may go: reserved in the database, or (`local`) not metered here."""

    key: Key
    cost: Cost
    learning: bool = False  # this call learns the model's limits
    local: bool = False  # nothing reserved: nothing to give back
    at: float = field(default_factory=time.monotonic, compare=False)  # when reserved


@dataclass(frozen=True)
class Refusal:
    """A call that does not fit: `wait` seconds until it does, or never (`too_big`)."""

    wait: float
    reason: str
    too_big: bool = False


@dataclass(frozen=True)
class Taken:
    """Reservations taken for jobs about to be claimed."""

    granted: int
    wait: float = 0.0
    too_big: bool = False


@dataclass
class _Permit:
    cost: Cost
    learning: bool
    at: float = field(default_factory=time.monotonic)


class Quotas:
    def __init__(self, pool: AsyncConnectionPool[Any] | None, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.lease = settings.ai_timeout_seconds + 5  # a learning call's, like a probe's
        # Calls at once while a model's limits are learned: as many as open a breaker,
        # so that a provider that hangs is found as fast as without quotas.
        self.learners = settings.provider_breaker_threshold
        self.metered: dict[Key, bool] = {}  # what the database last said of each model
        self.permits: dict[Key, deque[_Permit]] = {}
        self.limited = 0  # 429s met despite a reservation (tests, logs)
        self.on_change: Callable[[], None] | None = None  # a model's limits were learned
        self._db_ok = True

    def caps(self, key: Key) -> list[int | None]:
        caps = self.settings.caps_for(*key)
        return [caps.get(k) for k in KINDS]

    def is_metered(self, key: Key) -> bool:
        """Known to be metered: capped, or so the database said (learning included)."""
        return self.metered.get(key, False) or any(c is not None for c in self.caps(key))

    # -- a call ----------------------------------------------------------------

    async def reserve(self, key: Key, cost: Cost) -> Grant | Refusal:
        """Reserve one call, from a permit taken for it if there is one."""
        if self.pool is None:
            return Grant(key, cost, local=True)
        held = self.permits.get(key)
        if held:
            permit = held.popleft()
            return Grant(key, permit.cost, learning=permit.learning, at=permit.at)
        if self.metered.get(key) is False and not self.is_metered(key):
            return Grant(key, cost, local=True)  # answers without limits: nothing to hold
        row = await self._query(dal.QUOTA_RESERVE, self._reserve_params(key, cost, 1))
        if row is None:
            return Grant(key, cost, local=True)
        self._learn(key, row["metered"])
        if row["granted"]:
            return Grant(key, cost, learning=row["learning"], local=not row["metered"])
        return self._refusal(key, cost, row)

    async def settle(
        self,
        grant: Grant,
        *,
        counted: Cost | None,
        limits: RateLimits,
        sent_at: float,
        heard: bool,
        limited: bool = False,
        returned: list[float] | None = None,
    ) -> None:
        """After the call. `counted`: what the provider counted (None: unknown, the
        reservation stands); `heard`: an answer came, an error's included;
        `limited`: it was a 429 (the provider counted nothing); `returned`: what
        the provider gave back after writing its headers (see returned())."""
        if limited and not grant.local:
            self.limited += 1
            logger.bind(action="quota_exceeded", provider=grant.key[0], model=grant.key[1]).warning(
                "{} refused a reserved call of {} (429): its quota is corrected from the "
                "answer and every worker backs off",
                grant.key[0],
                grant.key[1],
            )
        if grant.local and not limits:
            return  # nothing reserved, nothing learned
        back = [0.0] * 4
        # A learning call took nothing from the buckets (no limit was known): the
        # levels it meets come from its headers alone.
        if not grant.local and not grant.learning:
            if limited:
                back = grant.cost.vector()
            elif counted is not None:
                back = grant.cost.minus(counted)
        window = limits.window_read()
        params = {
            "provider": grant.key[0],
            "model": grant.key[1],
            "back": back,
            "caps": self.caps(grant.key),
            "limits": limits.limits(),
            "remaining": [
                None if r is None else r + (returned[i] if returned else 0.0)
                for i, r in enumerate(limits.remaining())
            ],
            "age": max(0.0, time.time() - sent_at),
            # The row keeps the most exact window read (sql/037): how far off it may be.
            "window": None if window is None else window.seconds,
            "window_error": None if window is None else window.error,
            "heard": heard,
            "learning": int(grant.learning),
            "limited": limited,
            "reserved": time.monotonic() - grant.at,
        }
        row = await self._query(dal.QUOTA_SETTLE, params)
        if row is not None:
            was = self.metered.get(grant.key)
            self._learn(grant.key, row["metered"])
            if (grant.learning or was != row["metered"]) and self.on_change:
                self.on_change()

    async def give_back_returned(self, key: Key, returned: list[float] | None) -> None:
        """What the provider gave back after the headers a learning call was settled
        from at its stream's start (Anthropic: the output it held as max_tokens,
        less the output produced); see returned()."""
        if self.pool is None or not returned or not any(returned):
            return
        await self._return(key, returned, 0)

    async def release(self, grant: Grant) -> None:
        """A reservation not used (the breaker turned the call away)."""
        if not grant.local:
            await self._give_back(grant.key, [_Permit(grant.cost, grant.learning)])

    # -- permits: reservations for jobs about to be claimed ---------------------

    async def take(self, key: Key, cost: Cost, n: int) -> Taken:
        """Reserve up to `n` calls of `cost`, kept here for the jobs claimed next."""
        if self.pool is None or n <= 0:
            return Taken(n)
        row = await self._query(dal.QUOTA_RESERVE, self._reserve_params(key, cost, n))
        if row is None:
            return Taken(n)  # the database is away: the calls are not held back here
        self._learn(key, row["metered"])
        if not row["metered"]:
            return Taken(n)
        granted = row["granted"]
        if granted:
            held = self.permits.setdefault(key, deque())
            held.extend(_Permit(cost, row["learning"]) for _ in range(granted))
        refusal = self._refusal(key, cost, row)
        return Taken(granted, refusal.wait, refusal.too_big)

    async def give_back(self, key: Key, n: int) -> None:
        """`n` permits of `key` not needed after all (fewer jobs were claimed)."""
        held = self.permits.get(key)
        taken = [held.pop() for _ in range(min(n, len(held)))] if held else []
        await self._give_back(key, taken)

    async def expire(self, after: float = PERMIT_SECONDS) -> None:
        """Give back the permits no job used in `after` seconds (a cache hit, a job
        that went to another provider; all of them at shutdown): every worker may
        use them again."""
        now = time.monotonic()
        for key, held in list(self.permits.items()):
            old = []
            while held and now - held[0].at >= after:
                old.append(held.popleft())
            await self._give_back(key, old)

    async def _give_back(self, key: Key, permits: list[_Permit]) -> None:
        if not permits:
            return
        back = [sum(p.cost.vector()[i] for p in permits if not p.learning) for i in range(4)]
        oldest = time.monotonic() - min(p.at for p in permits)
        await self._return(key, back, sum(p.learning for p in permits), oldest)

    async def _return(
        self, key: Key, back: list[float], learning: int, reserved: float | None = None
    ) -> None:
        """Put `back` into the buckets and end `learning` learning calls, nothing heard.
        `reserved`: seconds since the oldest of them was reserved (what a 429 since
        then wiped is not put back; None: the provider gave it back)."""
        params = {
            "provider": key[0],
            "model": key[1],
            "back": back,
            "caps": self.caps(key),
            "limits": None,
            "remaining": None,
            "age": 0.0,
            "window": None,
            "window_error": None,
            "heard": False,
            "learning": learning,
            "limited": False,
            "reserved": reserved,
        }
        await self._query(dal.QUOTA_SETTLE, params)

    # -- plumbing --------------------------------------------------------------

    def _reserve_params(self, key: Key, cost: Cost, n: int) -> dict[str, Any]:
        return {
            "provider": key[0],
            "model": key[1],
            "n": n,
            "cost": cost.vector(),
            "caps": self.caps(key),
            "lease": self.lease,
            "learners": self.learners,
        }

    def _refusal(self, key: Key, cost: Cost, row: Any) -> Refusal:
        name = f"{key[0]} {key[1]}"
        if row["too_big"]:
            return Refusal(0.0, f"a call needs more than {name} allows per minute", True)
        wait = float(row["wait_seconds"] or 0.0)
        if row["learning"]:
            return Refusal(min(wait, LEARNING_RECHECK_SECONDS), f"learning {name}'s rate limits")
        return Refusal(wait, f"quota spent, a call fits in {wait:.1f}s")

    def _learn(self, key: Key, metered: bool) -> None:
        self.metered[key] = metered

    async def _query(self, query: dal.Query[Any], params: dict[str, Any]) -> Any:
        assert self.pool is not None
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                    row = await query.first(conn, params)
        except Exception as exc:
            if self._db_ok:
                self._db_ok = False
                logger.bind(action="quotas_local").warning(
                    "provider quotas not shared ({}): calls go without a reservation",
                    diagnose(exc, self.pool),
                )
            return None
        if not self._db_ok:
            self._db_ok = True
            logger.bind(action="quotas_shared").info("provider quotas shared again")
        return row
