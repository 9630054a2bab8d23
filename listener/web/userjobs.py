"""What the end-user API does in the database, as the user (as_user): the
request bodies, read with the models the worker and `ai-jobs enqueue` use, and
the calls of listener/queries/api.sql, with rows turned into the API's JSON."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from listener import dal, params
from listener.errors import InvalidJob, JobNotFound
from listener.rows import ApiJobRow
from listener.web.tokens import User

_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


class _Request(BaseModel):
    # Strict: `"batch": "yes"` is refused, not read as true. Unknown keys (status,
    # retry_count, result_path, progress, created_by, ...) are refused by name.
    model_config = ConfigDict(extra="forbid", strict=True)

    params: dict[str, Any] = Field(default_factory=dict)
    course_id: str | None = None
    batch: bool = False
    trace_parent: str | None = None

    @field_validator("trace_parent")
    @classmethod
    def _w3c(cls, v: str | None) -> str | None:
        if v is not None and not _TRACEPARENT.fullmatch(v):
            raise ValueError(
                "must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>, lower case,"
                " ids not all zeros"
            )
        return v


JobRequest = _Request  # either body, as the API passes it on


class CourseRequest(_Request):
    subject: str


class MediaRequest(_Request):
    prompt: str
    media_type: Literal["image", "audio"]


def parse(model: type[_Request], body: Any, job_type: str) -> _Request:
    """The request, or InvalidJob naming its first problem."""
    if not isinstance(body, dict):
        raise InvalidJob("Invalid request: the body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise InvalidJob(f"Invalid request: {where}: {err['msg']}") from None
    params.check(job_type, request.params)  # what the worker would refuse, refused now
    return request


def view(row: ApiJobRow) -> dict[str, Any]:
    """A job as the API shows it."""
    done = row["completed_at"]
    return {
        "id": str(row["id"]),
        "table": row["job_table"],
        "status": row["status"],
        "progress": row["progress"],
        "partial_result": row["partial_result"],
        "result_path": row["result_path"],
        "error": row["error"],
        "created_at": row["created_at"].isoformat(),
        "completed_at": done.isoformat() if done else None,
    }


Pool = AsyncConnectionPool[Any]
USER_STATEMENT_TIMEOUT_MS = 5000  # an end user's statement: never longer than this


@asynccontextmanager
async def as_user(
    pool: Pool, claims: str, *, wait: float = 5.0
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction on a pool connection, run as role `authenticated` with a
    JWT's claims in `request.jwt.claims`, as PostgREST runs a request: row-level
    security, the column grants, the rate limit and the budget apply as they do
    to a Supabase client. Everything is undone at the transaction's end (local
    settings), so the connection goes back to the pool as it came."""
    params = {"claims": claims, "statement_timeout": str(USER_STATEMENT_TIMEOUT_MS)}
    async with pool.connection(timeout=wait) as conn, conn.transaction():
        await dal.API_AS_USER.run(conn, params)
        yield conn


async def create(pool: Pool, user: User, request: _Request) -> dict[str, Any]:
    common = {
        "params": Jsonb(request.params),
        "course_id": request.course_id,
        "batch": request.batch,
        "trace_parent": request.trace_parent,
    }
    async with as_user(pool, user.claims) as conn:
        if isinstance(request, CourseRequest):
            row = await dal.API_CREATE_COURSE.one(conn, {**common, "subject": request.subject})
        else:
            assert isinstance(request, MediaRequest)
            row = await dal.API_CREATE_MEDIA.one(
                conn, {**common, "prompt": request.prompt, "media_type": request.media_type}
            )
    return {"id": str(row["id"]), "status": row["status"]}


async def rows(pool: Pool, user: User, job_ids: list[str]) -> list[ApiJobRow]:
    async with as_user(pool, user.claims) as conn:
        return await dal.API_JOBS.all(conn, {"ids": job_ids})


async def jobs_of(pool: Pool, wanted: list[tuple[User, list[str]]]) -> list[list[dict[str, Any]]]:
    """For each (user, job ids): the jobs of those ids that user may see, each
    user's read as role authenticated with their claims, all in one statement
    (ai_job_read_as_users; the event streams' read)."""
    claims, ids, readers = [], [], []
    for i, (user, job_ids) in enumerate(wanted, start=1):
        claims.append(user.claims)
        ids += job_ids
        readers += [i] * len(job_ids)
    found: list[list[dict[str, Any]]] = [[] for _ in wanted]
    params = {"claims": claims, "ids": ids, "readers": readers}
    for row in await dal.API_READ_AS_USERS.all(pool, params):
        found[row["reader"] - 1].append(view(row))
    return found


async def one(pool: Pool, user: User, job_id: str) -> ApiJobRow:
    """The user's job, or JobNotFound: another user's job is not found either."""
    found = await rows(pool, user, [job_id])
    if not found:
        raise JobNotFound(f"Job {job_id} not found")
    return found[0]


async def cancel(pool: Pool, user: User, job_id: str) -> dict[str, Any]:
    """cancel_job as the user: the database decides whose job it is."""
    async with as_user(pool, user.claims) as conn:
        found = await dal.API_JOBS.all(conn, {"ids": [job_id]})
        if not found:
            raise JobNotFound(f"Job {job_id} not found")
        row = await dal.CANCEL_JOB.one(conn, {"id": job_id, "table": found[0]["job_table"]})
    return {"id": job_id, "status": "cancelled", "previous": row["previous"]}
