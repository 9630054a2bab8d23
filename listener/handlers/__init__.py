"""The generation handlers, one per job table, and what they share (providers,
storage, catalog) bundled as a Runtime that the worker opens and closes.

The worker's contract: `handlers[table](job)` returns an Outcome or raises
(InvalidJob: never retry; anything else: a failed attempt); `tick()` runs every
few seconds (catalog batching); `aclose()` runs once at shutdown (the last catalog
render, SDK clients closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener.catalog import Catalog, CourseCache
from listener.handlers.course import CourseHandler
from listener.handlers.media import MediaHandler
from listener.jobs import HandlerMap
from listener.providers import Providers, pricing
from listener.providers.breaker import Breakers
from listener.providers.chain import Chain
from listener.providers.meter import Meter
from listener.providers.quota import Quotas
from listener.results import Results
from listener.settings import Settings
from listener.storage import Storage, open_storage
from listener.telemetry import init_sentry


@dataclass
class Runtime:
    settings: Settings
    pool: AsyncConnectionPool[Any] | None
    providers: Providers
    storage: Storage
    catalog: Catalog
    cache: CourseCache
    chain: Chain
    results: Results
    handlers: HandlerMap = field(default_factory=dict)

    async def tick(self) -> None:
        """Periodic housekeeping (called by the worker's timer): usage, the
        catalog, and about every sweep interval, results staged by processes that
        died before publishing them (listener/results.py)."""
        await self.chain.meter.flush()
        await self.chain.quotas.expire()
        await self.catalog.tick()
        await self.results.tick()

    async def start(self) -> None:
        """What needs the database, once the pool is open: close the breakers a
        credentials error opened (this process may hold a fixed key)."""
        names = [p.name for p in self.providers.course if p.name != "placeholder"]
        await self.chain.breakers.forget_auth(names)

    def announce(self) -> None:
        logger.bind(
            action="handlers_ready",
            course_providers=[p.name for p in self.providers.course],
            media_providers=[p.name for p in self.providers.media],
            storage=self.storage.location,
        ).info("generation handlers ready")

    async def aclose(self) -> None:
        """Flush and release what the handlers hold (called once at shutdown)."""
        try:
            await self.chain.meter.flush()
            await self.chain.quotas.expire(after=0)  # reservations no job will use
            await self.catalog.flush()
        finally:
            await self.providers.aclose()
            await self.storage.aclose()


async def create_runtime(
    settings: Settings,
    pool: AsyncConnectionPool[Any] | None,
    *,
    announce: bool = True,
    start: bool = True,
) -> Runtime:
    """Everything the handlers need. With `start=False`, without touching the
    database (the worker builds its handlers before it opens its pool, so that a
    configuration error stops the process before any connection is opened), and
    `Runtime.start()` comes later."""
    init_sentry(settings)
    pricing.configure(settings.pricing_overrides)
    providers = Providers.from_settings(settings)
    storage = open_storage(settings, timeout=settings.ai_timeout_seconds)
    catalog = Catalog(pool, storage, settings.catalog_batch_jobs, settings.catalog_batch_seconds)
    known = {settings.openai_model, settings.anthropic_model}
    known |= {settings.openai_image_model, settings.openai_tts_model}
    chain = Chain(settings, Breakers(pool, settings), Meter(pool, known), Quotas(pool, settings))
    cache = CourseCache(pool)
    results = Results(storage, pool, every=settings.sweep_interval_seconds)
    rt = Runtime(settings, pool, providers, storage, catalog, cache, chain, results)
    rt.handlers = {
        "ai_course_jobs": CourseHandler(settings, providers, chain, storage, catalog, cache),
        "ai_media_jobs": MediaHandler(settings, providers, chain, storage),
    }
    if start:
        await rt.start()
    if announce:
        rt.announce()
    return rt
