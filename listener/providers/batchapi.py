"""What a provider's Batch API offers the batch jobs (listener/batches/), and what
its answers become. One module per provider: batch_openai.py (course jobs through
Chat Completions, image jobs through the Images API), batch_anthropic.py (course
jobs). A Batch API batches the jobs of one table (`table`): a batch has one
endpoint, and its requests are that table's (a CoursePrompt or an ImageRequest).

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

import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from uuid import UUID

from listener.providers.base import Answer, CoursePrompt, Media
from listener.providers.quota import CHARS_PER_TOKEN

META_KEY = "ai_jobs_batch"  # the batch's own id, in the provider's batch metadata
ENDED = ("completed", "expired", "failed", "cancelled")
LIST_PAGE = 100  # batches a page when one is looked for by its intent
LIST_MAX = 1000  # batches looked at, at most
MAX_REQUESTS = 1000  # requests in one of our batches, at most (collect.MAX_JOBS)


@dataclass(frozen=True)
class ImageRequest:
    """An image job's request: what the direct path's `image(prompt, size)` takes."""

    prompt: str
    size: str


Q = TypeVar("Q", CoursePrompt, ImageRequest)


@dataclass(frozen=True)
class Sent:
    batch_id: str  # the provider's
    file_id: str | None = None  # OpenAI: the uploaded input


@dataclass(frozen=True)
class State:
    outcome: str | None  # None while it runs; else one of ENDED
    error: str | None = None
    queue_full: bool = False  # failed for the provider's batch queue limit (OpenAI)
    queue_limit: int | None = None  # the limit the provider stated, if it did


class Unsure:
    """A batch that may be the lost intent's still runs at its provider, and only
    its results would tell (Anthropic's batches carry no metadata): the intent
    is looked at again later, never sent meanwhile."""

    def __repr__(self) -> str:
        return "UNSURE"


UNSURE = Unsure()


class QueueFull(Exception):
    """The provider refused the batch for its batch queue limit (Anthropic: 429 at
    the creation, its message naming the queue): its jobs wait for room, no
    attempt counted (sql/030, sql/032). `limit`: the one the message states."""

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class RequestFailed(Exception):
    """The provider answered this request of the batch with an error."""


@dataclass
class Results:
    """A batch's results by job: an Answer (a course job's) or a Media (an image
    job's), or the exception that ends the job's attempt (Refused,
    RequestFailed). Jobs without a usable result are absent (expired, cancelled
    in the batch): they go back to pending."""

    answers: dict[UUID, Answer | Media | BaseException] = field(default_factory=dict)
    skipped: int = 0  # lines not JSON, naming no job of the batch, or a job twice


class BatchAPI(Protocol[Q]):
    name: str
    model: str
    table: str  # the job table whose batches it sends

    @property
    def scope(self) -> str:
        """The batch queue the provider counts this model's batches in: the model
        (OpenAI), or '*' (Anthropic: every model)."""
        ...

    def units(self, request: Q) -> int:
        """What one request holds in that queue: its estimated input tokens
        (OpenAI: a course's prompt and schema, an image's prompt), or 1
        (Anthropic: requests)."""
        ...

    async def submit(
        self, intent: UUID, requests: list[tuple[UUID, Q]], hook: Callable[[str], None]
    ) -> Sent:
        """Send one batch; `hook(moment)` is called after the upload and after the
        creation (the crash tests' moments)."""
        ...

    async def find(
        self, intent: UUID, since: float, until: float, jobs: set[UUID], known: set[str]
    ) -> Sent | Unsure | None:
        """The batch sent for `intent` (created between `since` and `until`, epoch
        seconds: the intent's holder was alive then; with a request for each of
        `jobs`, recorded by no other intent: not in `known`), if the provider has
        it; None if it was never created; UNSURE while a batch that may be it
        still runs and cannot be told yet."""
        ...

    async def state(self, batch_id: str) -> State: ...

    async def results(self, batch_id: str, jobs: set[UUID]) -> Results: ...

    async def cancel(self, batch_id: str) -> None: ...


def lines(data: bytes | str) -> Iterator[Any]:
    """The JSON objects of a JSONL file, one line at a time (a results file of
    images is tens of MB: no copy of it whole is made); lines that are not JSON
    objects are None, a line nested too deep for the parser included."""
    raw = data.encode() if isinstance(data, str) else data
    for line in io.BytesIO(raw):
        if not line.strip():
            continue
        try:
            doc = json.loads(line.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            yield None
            continue
        yield doc if isinstance(doc, dict) else None


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


def input_tokens(prompt: CoursePrompt) -> int:
    """A request's input tokens, estimated on the high side as the per-minute
    quotas do (quota.estimate): the instructions, the request and the schema."""
    size = len(prompt.system) + len(prompt.user) + len(json.dumps(prompt.schema))
    return math.ceil(size / CHARS_PER_TOKEN)


def image_tokens(request: ImageRequest) -> int:
    """An image request's input tokens, estimated on the high side as
    input_tokens: its prompt (at least one). What OpenAI's enqueued-token limit
    of the image model counts of it (docs/generation.md, "Batch jobs")."""
    return max(1, math.ceil(len(request.prompt) / CHARS_PER_TOKEN))


_LIMIT = re.compile(r"Limit:\s*([0-9][0-9,]{0,30})\s*enqueued tokens", re.IGNORECASE)
_QUEUE_LIMIT = re.compile(r"\blimit of\s*([0-9](?:[0-9,]{0,30}[0-9])?)(?![0-9])", re.IGNORECASE)
MAX_LIMIT = 10**12  # a stated limit above it (or below 1) is not believed
READ_CHARS = 2000  # what is read of a provider's message


def stated_limit(message: str | None) -> int | None:
    """The limit in OpenAI's refusal ("... Limit: 2,000,000 enqueued tokens. ..."),
    or None: no number, a number out of bounds, or digits that are not one."""
    if not message:
        return None
    return _number(_LIMIT.search(message[:READ_CHARS]))


def queue_refusal(message: str | None) -> bool:
    """Whether Anthropic's 429 at a batch's creation speaks of its batch queue
    (the requests processing in all batches), not of a per-minute limit of the
    Batches endpoints: it names the queue."""
    return bool(message) and "queue" in str(message)[:READ_CHARS].lower()


def queue_limit(message: str | None) -> int | None:
    """The limit in Anthropic's queue refusal ("... exceeds the limit of 100000
    ..."), or None, bounded as stated_limit's."""
    if not message:
        return None
    return _number(_QUEUE_LIMIT.search(message[:READ_CHARS]))


def _number(m: re.Match[str] | None) -> int | None:
    if m is None:
        return None
    digits = m.group(1)
    if not re.fullmatch(r"[0-9]{1,3}(,[0-9]{3})*|[0-9]+", digits):
        return None
    n = int(digits.replace(",", ""))
    return n if 1 <= n <= MAX_LIMIT else None
