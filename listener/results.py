"""A job's stored result, fenced by its claim (docs/design.md, "Fenced results").

A worker paused past STALE_AFTER (a frozen VM, a stop-the-world stall) wakes up
after its job was rescued and finished elsewhere: its database writes are refused
(they carry the claim's token), and its storage writes must be too, or it would
replace the winner's file under a row that describes the winner's.

- `store`: the result goes to its public path (`courses/<id>/course.json`,
  `media/<jobId>.<ext>`) only if nothing is there yet (`Storage.create`), so the
  usual first attempt's file is in place before its completion commits, as
  before. If the path is taken (an earlier attempt's file, a zombie's, a
  regenerated course), the result is staged under this attempt's own key,
  `.attempts/<jobId>.<claim token>`, and the outcome carries it (`Staged`).
- `Staged.publish`: called by the completer once the completion that holds the
  claim has committed, and only then: the staged bytes replace the public file.
  A completion that was refused discards them. So a file that replaces another
  is always a committed winner's, and once a job's path exists no create lands.
- `Results.recover`: a process that died between the commit and the publish
  leaves its staged file behind; every worker looks at `.attempts/` about every
  sweep interval and publishes a file whose job is `done` with its digest (unless
  a later job took the path), drops one whose attempt lost, and leaves one whose
  attempt still holds the claim.

The row's `metrics.resultSha256` is the digest of the bytes its completion
stored, so the row and the file can be checked against each other."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, tracing
from listener.jobs import Job
from listener.storage import Storage

STAGING = ".attempts"


def staged_key(job_id: UUID, token: UUID) -> str:
    return f"{STAGING}/{job_id}.{token}"


def parse_key(key: str) -> tuple[UUID, UUID] | None:
    """The job id and claim token of a staged key; None for anything else."""
    job_id, _, token = key.rpartition("/")[2].partition(".")
    try:
        return UUID(job_id), UUID(token)
    except ValueError:
        return None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Staged:
    """A result that waits for its completion to commit before it replaces the
    public file."""

    storage: Storage
    path: str  # the public path
    key: str  # this attempt's own
    data: bytes
    content_type: str

    async def publish(self) -> None:
        """The completion committed: the result becomes the job's (the bytes in
        memory, so a staged file removed meanwhile loses nothing)."""
        await self.storage.write(self.path, self.data, self.content_type)
        await self.storage.delete(self.key)

    async def discard(self) -> None:
        """The completion was refused: this attempt lost its claim."""
        await self.storage.delete(self.key)


@dataclass
class Stored:
    sha256: str
    staged: Staged | None  # None: written at its public path at once


@tracing.traced("storage write")
async def store(storage: Storage, job: Job, path: str, data: bytes, content_type: str) -> Stored:
    """Write `data` as `job`'s result at `path`, fenced (see the module's docstring)."""
    if await storage.create(path, data, content_type):
        return Stored(digest(data), None)
    key = staged_key(job.id, job.claim_token)
    await storage.write(key, data, content_type)
    return Stored(digest(data), Staged(storage, path, key, data, content_type))


class Results:
    """The staged results left behind by processes that died, put right."""

    def __init__(
        self, storage: Storage, pool: AsyncConnectionPool[Any] | None, every: float
    ) -> None:
        self.storage = storage
        self.pool = pool
        self.every = every
        self._last = time.monotonic()  # the first look waits for one interval
        self.recovered = 0  # staged results published by the recovery
        self.dropped = 0  # staged results of attempts that lost, removed

    async def tick(self) -> None:
        if self.pool is None or time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        await self.recover()

    async def recover(self) -> int:
        """Look at every staged result once; return how many were published."""
        assert self.pool is not None
        found = [(k, parsed) for k in await self.storage.list(STAGING) if (parsed := parse_key(k))]
        if not found:
            return 0
        params = {"ids": [p[0] for _, p in found], "tokens": [p[1] for _, p in found]}
        rows = {(r["id"], r["token"]): r for r in await dal.STAGED_RESULTS.all(self.pool, params)}
        published = 0
        for key, ident in found:
            row = rows.get(ident)
            if row is None or row["running"]:
                continue  # its attempt still holds the claim
            data = await self.storage.read(key)
            path = row["result_path"]
            ok = row["status"] == "done" and not row["superseded"] and path is not None
            if data is not None and ok and digest(data) == row["sha256"]:
                assert path is not None
                ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
                await self.storage.write(path, data, ctype)
                published += 1
                logger.bind(action="result_recovered", job_id=str(ident[0]), path=path).warning(
                    f"published {path}, staged by an attempt whose completion committed"
                )
            else:
                self.dropped += 1
            await self.storage.delete(key)
        self.recovered += published
        return published


async def settle(staged: Staged, won: bool) -> None:
    """Publish or discard a staged result, once its completion's fate is known;
    a failure is logged and left to the recovery."""
    try:
        await (staged.publish() if won else staged.discard())
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.bind(action="result_publish_failed", path=staged.path).warning(
            f"could not {'publish' if won else 'discard'} {staged.path} ({exc}); the recovery will"
        )
