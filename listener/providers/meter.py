"""What every provider call spent: per job, for the budget (ai_job_charges), and
added up per provider and model, for /metrics (ai_jobs_tokens_total,
ai_jobs_cost_usd_total).

Every call that got an answer counts, those of failed attempts and repair rounds
too: the provider bills them all. A job's call is written as it returns, before
the job's end is (a user's spend must never read less than was paid: see
sql/021); while the database is away it waits here and goes with the next tick.
The sums go to ai_job_usage_totals every few seconds (the handlers' tick) and at
shutdown. Labels come from bounded sets: the known providers, and the configured
or priced models, others folded into "other". A job's own metrics keep its share.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.providers import pricing
from listener.providers.base import Usage
from listener.settings import PROVIDERS

DB_WAIT_SECONDS = 2.0
# The GenAI conventions' advisory bucket bounds (gen_ai.client.token.usage and
# gen_ai.client.operation.duration); sql/028 keeps one count per bound, and +Inf.
TOKEN_BOUNDS = tuple(4.0**k for k in range(14))  # 1, 4, 16, ... 67,108,864
DURATION_BOUNDS = tuple(0.01 * 2**k for k in range(14))  # 0.01 s ... 81.92 s
TOKEN_USAGE, OPERATION_DURATION = "token_usage", "operation_duration"
# (metric, operation, provider, model, token type)
HistKey = tuple[str, str, str, str, str]


@dataclass
class Histogram:
    counts: list[int]
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float, bounds: tuple[float, ...]) -> None:
        self.counts[bisect.bisect_left(bounds, value)] += 1
        self.sum += value
        self.count += 1

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count


@dataclass
class Sums:
    calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Sums) -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd


class Payer(Protocol):
    """The job a call is made for (listener.jobs.Job)."""

    @property
    def table(self) -> str: ...

    @property
    def id(self) -> UUID: ...

    @property
    def lane(self) -> str: ...


@dataclass(frozen=True)
class Charge:
    table: str
    job_id: UUID
    provider: str
    model: str
    usage: Usage


def spent(usage: Usage) -> bool:
    """Whether a call may have cost something: False for the placeholder; True for
    a call without a price (the budget counts it at its estimate)."""
    return bool(usage.input_tokens or usage.output_tokens or usage.cost_usd != 0)


def _cost(usage: Usage) -> float | None:
    return None if usage.cost_usd is None else round(usage.cost_usd, 9)


class Meter:
    def __init__(self, pool: AsyncConnectionPool[Any] | None, known_models: set[str]) -> None:
        self.pool = pool
        self.known_models = known_models
        self.pending: dict[tuple[str, str], Sums] = {}
        self.unsaved: list[Charge] = []  # calls of jobs not written yet (the database was away)
        self.histograms: dict[HistKey, Histogram] = {}  # observed since the last flush
        self._lock = asyncio.Lock()

    async def charge(
        self, job: Payer | None, provider: str, model: str | None, usage: Usage
    ) -> None:
        """One call made for a job: in the totals, and written at once as the job's
        (shielded: a job cancelled meanwhile still has its call recorded)."""
        self.add(provider, model, usage)
        if job is None or self.pool is None or not spent(usage):
            return
        await asyncio.shield(self._save([Charge(job.table, job.id, provider, model or "?", usage)]))

    async def _save(self, charges: list[Charge]) -> None:
        assert self.pool is not None
        params = {
            "tables": [c.table for c in charges],
            "ids": [c.job_id for c in charges],
            "providers": [c.provider for c in charges],
            "models": [c.model for c in charges],
            "input": [c.usage.input_tokens for c in charges],
            "cached": [c.usage.cached_input_tokens for c in charges],
            "output": [c.usage.output_tokens for c in charges],
            "costs": [_cost(c.usage) for c in charges],
        }
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                    await dal.ADD_CHARGES.run(conn, params)
        except Exception as exc:
            self.unsaved.extend(charges)  # for the next tick
            logger.bind(action="charges_deferred").warning(
                "{} provider call(s) of jobs saved later ({})",
                len(charges),
                diagnose(exc, self.pool),
            )

    def add(self, provider: str, model: str | None, usage: Usage) -> None:
        if not (usage.input_tokens or usage.output_tokens or usage.cost_usd):
            return  # the placeholder, or a call that spent nothing we know of
        key = (
            provider if provider in PROVIDERS else "other",
            pricing.model_label(model, self.known_models),
        )
        self.pending.setdefault(key, Sums()).add(
            Sums(
                1,
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.output_tokens,
                usage.cost_usd or 0.0,
            )
        )

    def observe(
        self, operation: str, provider: str, model: str, seconds: float, usage: Usage | None
    ) -> None:
        """One provider call's duration (answered or failed) and, when it was
        answered, its tokens: the GenAI histograms of /metrics (sql/028)."""
        if provider not in PROVIDERS:
            return  # the placeholder: no provider call
        label = pricing.model_label(model, self.known_models)
        self._hist((OPERATION_DURATION, operation, provider, label, ""), seconds, DURATION_BOUNDS)
        if usage is not None and (usage.input_tokens or usage.output_tokens):
            for kind, n in (("input", usage.input_tokens), ("output", usage.output_tokens)):
                self._hist((TOKEN_USAGE, operation, provider, label, kind), n, TOKEN_BOUNDS)

    def _hist(self, key: HistKey, value: float, bounds: tuple[float, ...]) -> None:
        h = self.histograms.get(key)
        if h is None:
            h = self.histograms[key] = Histogram([0] * (len(bounds) + 1))
        h.observe(value, bounds)

    async def _flush_histograms(self) -> None:
        assert self.pool is not None
        taken, self.histograms = self.histograms, {}
        keys, hs = list(taken), list(taken.values())
        params = {
            "metrics": [k[0] for k in keys],
            "operations": [k[1] for k in keys],
            "providers": [k[2] for k in keys],
            "models": [k[3] for k in keys],
            "token_types": [k[4] for k in keys],
            "counts": ["{" + ",".join(map(str, h.counts)) + "}" for h in hs],
            "sums": [h.sum for h in hs],
            "totals": [h.count for h in hs],
        }
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                    await dal.ADD_CALL_HISTOGRAMS.run(conn, params)
        except Exception as exc:
            for key, h in taken.items():  # kept for the next tick
                mine = self.histograms.get(key)
                if mine is None:
                    self.histograms[key] = h
                else:
                    mine.add(h)
            logger.bind(action="usage_deferred").warning(
                "call histograms saved later ({})", diagnose(exc, self.pool)
            )

    async def flush(self) -> None:
        if self.pool is not None and self.histograms and not self._lock.locked():
            async with self._lock:
                await self._flush_histograms()
        if self.pool is not None and self.unsaved:
            calls, self.unsaved = self.unsaved, []
            await self._save(calls)
        if self.pool is None or not self.pending or self._lock.locked():
            return
        async with self._lock:
            taken, self.pending = self.pending, {}
            keys, sums = list(taken), list(taken.values())
            params = {
                "providers": [k[0] for k in keys],
                "models": [k[1] for k in keys],
                "calls": [s.calls for s in sums],
                "input": [s.input_tokens for s in sums],
                "cached": [s.cached_input_tokens for s in sums],
                "output": [s.output_tokens for s in sums],
                "costs": [round(s.cost_usd, 6) for s in sums],
            }
            try:
                async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                    async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                        await dal.ADD_USAGE.run(conn, params)
            except Exception as exc:
                for key, s in taken.items():  # keep them for the next tick
                    self.pending.setdefault(key, Sums()).add(s)
                logger.bind(action="usage_deferred").warning(
                    "usage totals saved later ({})", diagnose(exc, self.pool)
                )
