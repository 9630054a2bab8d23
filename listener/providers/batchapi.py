"""What a provider's Batch API offers the batch jobs (listener/batches/), and what
its answers become. One module per provider: batch_openai.py, batch_anthropic.py.

A batch carries one request per job, its `custom_id` the job's id; the batch
itself is known by the id the database gave it before anything was sent (the
intent), which OpenAI keeps in the batch's metadata, so that a watcher that
finds the intent without the provider's batch id looks for it there instead of
sending it again. Anthropic's batches have no metadata: they are found by their
creation time and request count (see batch_anthropic.py).

A provider's results file is untrusted input: a line that is not JSON, names no
job of the batch, or names one a second time is skipped and counted, never a
crash, never a second result for a job."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from listener.providers.base import Answer, CoursePrompt

META_KEY = "ai_jobs_batch"  # the batch's own id, in the provider's batch metadata
ENDED = ("completed", "expired", "failed", "cancelled")


@dataclass(frozen=True)
class Sent:
    batch_id: str  # the provider's
    file_id: str | None = None  # OpenAI: the uploaded input


@dataclass(frozen=True)
class State:
    outcome: str | None  # None while it runs; else one of ENDED
    error: str | None = None


class RequestFailed(Exception):
    """The provider answered this request of the batch with an error."""


@dataclass
class Results:
    """A batch's results by job: an Answer, or the exception that ends the job's
    attempt (Refused, RequestFailed). Jobs without a usable result are absent
    (expired, cancelled in the batch): they go back to pending."""

    answers: dict[UUID, Answer | BaseException] = field(default_factory=dict)
    skipped: int = 0  # lines not JSON, naming no job of the batch, or a job twice


class BatchAPI(Protocol):
    name: str
    model: str

    async def submit(
        self, intent: UUID, requests: list[tuple[UUID, CoursePrompt]], hook: Callable[[str], None]
    ) -> Sent:
        """Send one batch; `hook(moment)` is called after the upload and after the
        creation (the crash tests' moments)."""
        ...

    async def find(self, intent: UUID, since: float, count: int, known: set[str]) -> Sent | None:
        """The batch sent for `intent` (created after `since`, epoch seconds, with
        `count` requests), if the provider has it; None if it was never created."""
        ...

    async def state(self, batch_id: str) -> State: ...

    async def results(self, batch_id: str, jobs: set[UUID]) -> Results: ...

    async def cancel(self, batch_id: str) -> None: ...


def lines(data: bytes | str) -> list[Any]:
    """The JSON objects of a JSONL file; lines that are not JSON objects are None."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    out: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            out.append(None)
            continue
        out.append(doc if isinstance(doc, dict) else None)
    return out


def job_of(doc: Any, jobs: set[UUID], seen: set[UUID]) -> UUID | None:
    """The job a result line names, if it is one of the batch's and not seen yet."""
    if not isinstance(doc, dict) or not isinstance(doc.get("custom_id"), str):
        return None
    try:
        job = UUID(doc["custom_id"])
    except ValueError:
        return None
    if job not in jobs or job in seen:
        return None
    seen.add(job)
    return job
