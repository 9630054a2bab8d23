"""What every provider call spent, added up per provider and model, for /metrics
(ai_jobs_tokens_total, ai_jobs_cost_usd_total).

Every call that got an answer counts, those of failed attempts and repair rounds
too: the provider bills them all. A job's own metrics keep its share. The sums
go to ai_job_usage_totals every few seconds (the handlers' tick) and at shutdown;
while the database is away they wait here. Labels come from bounded sets: the
known providers, and the configured or priced models, others folded into "other".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.providers import pricing
from listener.providers.base import Usage
from listener.settings import PROVIDERS

DB_WAIT_SECONDS = 2.0


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


class Meter:
    def __init__(self, pool: AsyncConnectionPool[Any] | None, known_models: set[str]) -> None:
        self.pool = pool
        self.known_models = known_models
        self.pending: dict[tuple[str, str], Sums] = {}
        self._lock = asyncio.Lock()

    def add(self, provider: str, model: str | None, usage: Usage) -> None:
        if not (usage.input_tokens or usage.output_tokens or usage.cost_usd):
            return  # the placeholder, or a call that spent nothing
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

    async def flush(self) -> None:
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
