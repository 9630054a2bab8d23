"""The generation handlers, one per job table, and what they share (providers,
storage, catalog) bundled as a Runtime that the worker opens and closes."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from listener.errors import GenerationError, InvalidJob
from listener.jobs import HandlerMap, Job, Outcome
from listener.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    pool: AsyncConnectionPool | None
    handlers: HandlerMap = field(default_factory=dict)

    async def tick(self) -> None:
        """Periodic housekeeping (called by the worker's timer)."""

    async def aclose(self) -> None:
        """Flush and release what the handlers hold (called once at shutdown)."""


async def create_runtime(settings: Settings, pool: AsyncConnectionPool | None) -> Runtime:
    rt = Runtime(settings, pool)
    root = settings.storage_root

    async def course(job: Job) -> Outcome:
        subject = str(job.row.get("subject") or "").strip()
        course_id = str(job.row.get("course_id") or "")
        if not subject or not course_id:
            raise InvalidJob("Invalid job: subject and course_id are required")
        t0 = time.perf_counter()
        await asyncio.sleep(settings.placeholder_delay_ms / 1000)
        if job.params.get("simulateFailure"):
            raise GenerationError(f"placeholder: {job.params['simulateFailure']}")
        rel = f"courses/{course_id}/course.json"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({"id": course_id, "title": subject}).encode())
        ms = round((time.perf_counter() - t0) * 1000, 3)
        return Outcome(rel, {"generationDurationMs": ms, "provider": "placeholder"})

    rt.handlers = {"ai_course_jobs": course}
    return rt


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
