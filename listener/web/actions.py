"""The dashboard's actions: the runbook's (mark stale, dead letter, requeue) and
the console's (cancel, pause and resume, bulk on a filter). Every one is a POST
that the guard has already authenticated and checked for CSRF and origin; each
answers JSON to the page's fetch, or goes back to the page after a plain form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response

from listener import console, ops
from listener.errors import InvalidJob
from listener.web.auth import Principal
from listener.web.responses import PAGE, harden

if TYPE_CHECKING:
    from listener.web.app import Dashboard

_DONE = {"requeue": "Requeued", "cancel": "Cancelled", "delete": "Deleted"}


def _job_ref(form: Any) -> tuple[UUID, str | None]:
    """`job=table:id` (the rows' buttons) or `id` with an optional `table`."""
    raw_job, raw_id, raw_table = form.get("job"), form.get("id"), form.get("table")
    if isinstance(raw_job, str) and ":" in raw_job:
        raw_table, _, raw_id = raw_job.partition(":")
    if raw_table is not None and raw_table not in ops.TABLES:
        raise InvalidJob("table must be ai_course_jobs or ai_media_jobs")
    try:
        job_id = UUID(str(raw_id))
    except ValueError:
        raise InvalidJob("id must be a job UUID") from None
    return job_id, raw_table if isinstance(raw_table, str) else None


def _back(form: Any) -> str:
    nxt = form.get("next")
    return nxt if isinstance(nxt, str) else PAGE


class Actions:
    def __init__(self, d: Dashboard) -> None:
        self.d = d

    async def mark_stale(self, request: Request, who: Principal) -> Response:
        async with self.d.pool.connection() as conn:
            rows = await ops.mark_stale(conn, self.d.settings.stale_after_seconds)
        self.d.log.bind(action="web_mark_stale", count=len(rows)).info("marked stale")
        jobs = [{"job_id": str(r["job_id"]), "job_type": r["job_type"]} for r in rows]
        msg = f"Marked {len(rows)} job(s) stale"
        return harden(self.d.result(request, 200, msg, jobs=jobs))

    async def dead_letter(self, request: Request, who: Principal) -> Response:
        async with self.d.pool.connection() as conn:
            rows = await ops.dead_letter(conn)
        self.d.log.bind(action="web_dead_letter", count=len(rows)).info("moved to dead letter")
        jobs = [{"job_id": str(r["job_id"]), "job_type": r["job_type"]} for r in rows]
        msg = f"Moved {len(rows)} job(s) to the dead letter"
        return harden(self.d.result(request, 200, msg, jobs=jobs))

    async def requeue(self, request: Request, who: Principal) -> Response:
        form = await request.form()
        job_id, given = _job_ref(form)
        async with self.d.pool.connection() as conn:
            table = await ops.requeue(conn, job_id, given)
        self.d.log.bind(action="web_requeue", job_id=str(job_id), table=table).info("requeued")
        msg = f"Requeued {job_id} in {table}"
        back = _back(form)
        return harden(self.d.result(request, 200, msg, back, job_id=str(job_id), table=table))

    async def cancel(self, request: Request, who: Principal) -> Response:
        form = await request.form()
        job_id, given = _job_ref(form)
        async with self.d.pool.connection() as conn:
            table, was = await ops.cancel(conn, job_id, given)
        self.d.log.bind(action="web_cancel", job_id=str(job_id), table=table).info("cancelled")
        msg = f"Cancelled {job_id} (was {was.replace('_', ' ')})"
        back = _back(form)
        return harden(self.d.result(request, 200, msg, back, job_id=str(job_id), table=table))

    async def pause(self, request: Request, who: Principal) -> Response:
        form = await request.form()
        table, flag = form.get("table"), form.get("paused")
        if table not in ops.TABLES or flag not in ("0", "1"):
            raise InvalidJob("pause needs table (a job table) and paused (1 or 0)")
        assert isinstance(table, str)
        async with self.d.pool.connection() as conn:
            changed = await ops.set_paused(conn, table, flag == "1")
        verb = "Paused" if flag == "1" else "Resumed"
        self.d.log.bind(action=f"web_{verb.lower()}", table=table).info(verb.lower())
        msg = f"{verb} {table}" + ("" if changed else " (no change)")
        return harden(self.d.result(request, 200, msg, table=table, paused=flag == "1"))

    async def bulk(self, request: Request, who: Principal) -> Response:
        """An action on what the list's filter selects. `dry_run=1` (the default:
        a plain form post only counts) answers how many, for the confirmation."""
        form = await request.form()
        action = form.get("action")
        f = console.JobFilter.parse(form)
        dry_run = form.get("dry_run", "1") != "0"
        if not isinstance(action, str) or action not in console.BULK_ACTIONS:
            raise InvalidJob(f"action must be one of {', '.join(console.BULK_ACTIONS)}")
        async with self.d.pool.connection() as conn:
            n = await console.bulk(conn, action, f, dry_run)
        what = f.describe()
        statuses = "/".join(s.replace("_", " ") for s in console.BULK_ACTIONS[action])
        if dry_run:
            msg = f"{action.capitalize()} {n} job(s) ({statuses}) of {what}?"
            return harden(self.d.result(request, 200, msg, count=n, dry_run=True))
        self.d.log.bind(action=f"web_bulk_{action}", count=n, filter=what).info("bulk action")
        msg = f"{_DONE[action]} {n} job(s) of {what}"
        return harden(self.d.result(request, 200, msg, count=n, dry_run=False))
