"""The providers' Batch APIs for jobs that can wait (`batch = true`): half the
price, within 24 hours (docs/generation.md, "Batch jobs").

collect.py   the course handler's door: a batch job joins a collecting batch
             instead of calling a provider; a batch's answer comes back through it
submit.py    a batch sent: the intent recorded first, then the upload and creation
watch.py     every worker's watch: leases, heartbeats, polls, results, ends
crash.py     the crash tests' hook (AI_JOBS_TEST_CRASH_AT), inert otherwise
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from psycopg_pool import AsyncConnectionPool

from listener.batches.collect import AnsweredProviders, BatchRouter
from listener.batches.watch import BatchService
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.handlers import Runtime
    from listener.providers import Providers
    from listener.providers.batchapi import BatchAPI

COURSES = "ai_course_jobs"

__all__ = ["BatchRouter", "BatchService", "setup"]


def setup(settings: Settings, pool: AsyncConnectionPool[Any], runtime: Runtime) -> BatchService:
    """Route the runtime's course jobs through the batches (its handler map is
    replaced) and return the service the worker ticks and attaches to."""
    from listener.handlers.course import CourseHandler

    apis: list[BatchAPI] = []
    answered: dict[str, Any] = {}
    for p in runtime.providers.course:
        if p.name == "openai":
            from listener.providers.batch_openai import OpenAIBatches
            from listener.providers.openai import OpenAIProvider

            apis.append(OpenAIBatches(cast(OpenAIProvider, p)))
        elif p.name == "anthropic":
            from listener.providers.anthropic import AnthropicProvider
            from listener.providers.batch_anthropic import AnthropicBatches

            apis.append(AnthropicBatches(cast(AnthropicProvider, p)))
        else:
            continue
        answered[p.name] = CourseHandler(
            settings,
            cast("Providers", AnsweredProviders(p)),
            runtime.chain,
            runtime.storage,
            runtime.catalog,
            runtime.cache,
        )

    router = BatchRouter(
        pool, runtime.handlers[COURSES], answered.get, settings.stale_after_seconds / 3
    )
    router.charge = runtime.chain.meter.charge
    runtime.handlers = {**runtime.handlers, COURSES: router}
    return BatchService(settings, pool, router, apis)
