"""What a handler receives and returns. The worker owns the lifecycle; a handler
only turns one claimed job into a stored result, or raises."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from listener.rows import ClaimedRow

if TYPE_CHECKING:
    from listener.catalog import CatalogEntry
    from listener.results import Staged

JOB_TYPES = {"ai_course_jobs": "course", "ai_media_jobs": "media"}
TABLES_BY_TYPE = {v: k for k, v in JOB_TYPES.items()}
MEDIA_TABLE = "ai_media_jobs"
MEDIA_TYPES = ("image", "audio")  # the media_type check of ai_media_jobs (sql/001)

# A table's lanes: the jobs whose claims the claim gate holds or admits apart
# (listener/providers/gate.py), as their calls ask different models, which a
# provider meters on quotas of their own. A course job asks one model a
# provider; a media job the image model or the speech model, by its media_type.
LANES: dict[str, tuple[str, ...]] = {
    "ai_course_jobs": ("ai_course_jobs",),
    MEDIA_TABLE: tuple(f"{MEDIA_TABLE}:{t}" for t in MEDIA_TYPES),
}
# The media_type of a lane that is one (a media table's lane).
LANE_TYPES = {f"{MEDIA_TABLE}:{t}": t for t in MEDIA_TYPES}


def lane_of(table: str, media_type: object = None) -> str:
    """The lane of a job of `table` (with this media_type, for a media job)."""
    if table == MEDIA_TABLE and isinstance(media_type, str) and media_type in MEDIA_TYPES:
        return f"{MEDIA_TABLE}:{media_type}"
    return table


def lane_table(lane: str) -> str:
    return lane.partition(":")[0]


@dataclass(frozen=True)
class Job:
    table: str  # ai_course_jobs | ai_media_jobs
    id: UUID
    claim_token: UUID
    retry_count: int  # failed attempts before this one
    max_retries: int
    # The columns a handler reads, as claimed (sql/019: id, course_id, params, and
    # subject for a course job, prompt and media_type for a media job; JSON types).
    row: dict[str, Any]
    # The id as text (log fields, the task's name): formatted once, here.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", str(self.id))

    @property
    def attempt(self) -> int:
        return self.retry_count + 1

    @property
    def job_type(self) -> str:
        return JOB_TYPES[self.table]

    @property
    def lane(self) -> str:
        """Its claims' lane (LANES)."""
        return lane_of(self.table, self.row.get("media_type"))

    @property
    def params(self) -> dict[str, Any]:
        params = self.row.get("params")
        return params if isinstance(params, dict) else {}

    @classmethod
    def from_claim(cls, rec: ClaimedRow) -> Job:
        # What __init__ sets, without its seven frozen setattr calls (a claim
        # builds one Job per claimed row; tests/unit/test_jobs.py compares).
        job = cls.__new__(cls)
        job.__dict__.update(
            table=rec["job_table"],
            id=rec["id"],
            claim_token=rec["claim_token"],
            retry_count=rec["retry_count"],
            max_retries=rec["max_retries"],
            row=rec["job"],
            key=str(rec["id"]),
        )
        return job


@dataclass
class Outcome:
    """A finished job: where its result is stored (relative to the storage root)
    and its telemetry (at least generationDurationMs and provider; the worker adds
    totalDurationMs); a course's catalog row, saved with the job's completion; a
    result staged because its path was taken, published once the completion
    commits (listener/results.py)."""

    result_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    catalog: CatalogEntry | None = None
    staged: Staged | None = None


HandlerMap = Mapping[str, Callable[[Job], Awaitable[Outcome]]]


# The executor's "job started" line, written when the job's real work begins (a
# provider call, or the handler's end), not at the claim: a job that goes back to
# pending before it asked any provider has not started (listener/executor.py).
_BEGINS: ContextVar[Callable[[], None] | None] = ContextVar("ai_jobs_begins", default=None)


def work_begins() -> None:
    """Say that the running job's real work begins (its first provider call)."""
    hook = _BEGINS.get()
    if hook is not None:
        hook()


def on_work_begins(hook: Callable[[], None] | None) -> Any:
    """Set the hook of the job running in this task (a token for reset_work_begins)."""
    return _BEGINS.set(hook)


def reset_work_begins(token: Any) -> None:
    _BEGINS.reset(token)


@dataclass(frozen=True)
class Admitted:
    """What the claim gate allows a table's claim round: `n` jobs (None: as many
    as there are free slots), or none and for how long to hold its claims."""

    n: int | None
    wait: float = 0.0
    reason: str = ""
    quota: bool = False  # held for quotas alone (routine under load: logged quietly)


FREE = Admitted(None)


class Gate(Protocol):
    """The claim gate (listener/providers/gate.py), as the claim loop uses it."""

    on_change: Callable[[], None] | None

    def gates(self, lane: str) -> bool: ...

    async def admit(self, lane: str, wanted: int) -> Admitted: ...

    async def claimed(self, lane: str, got: int) -> None: ...
