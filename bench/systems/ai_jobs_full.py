"""This project's full pipeline: the course handler of listener.handlers with the
placeholder provider (ALLOW_PLACEHOLDER=1, no delay), local storage and catalog,
under the same worker settings as the no-op figure."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.systems import ai_jobs

LABEL = "ai-jobs (full pipeline)"
prepare = ai_jobs.prepare
open_enqueuer = ai_jobs.open_enqueuer
enqueue_bulk = ai_jobs.enqueue_bulk
remaining = ai_jobs.remaining


@contextlib.asynccontextmanager
async def worker(
    opts: argparse.Namespace, rec: Any
) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    async with ai_jobs.worker(opts, rec, full=True) as run:
        yield run
