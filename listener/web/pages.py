"""The dashboard's pages: the job list (filters, search, pages), one job in full
(with its result: the course rendered, the image shown, the audio playable), the
overview (charts, cost, workers) and the vendored charting library."""

from __future__ import annotations

import json
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from listener import console, ops
from listener.course_schema import Course
from listener.errors import JobNotFound
from listener.registry import live_seconds
from listener.rows import WorkerRow
from listener.settings import Settings
from listener.web import views
from listener.web.auth import Principal
from listener.web.responses import PAGE, harden

if TYPE_CHECKING:
    from listener.web.app import Dashboard

# What a result file may be served as (by its extension): the media the handlers
# write. Anything else is not served.
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
STATIC = {  # the vendored charting library (uPlot, MIT): file -> content type
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
MAX_COURSE_BYTES = 5_000_000


class Pages:
    def __init__(self, d: Dashboard) -> None:
        self.d = d

    async def jobs(self, request: Request, who: Principal) -> Response:
        f = console.JobFilter.parse(request.query_params)
        after = console.Cursor.parse(request.query_params.get("after"))
        async with self.d.pool.connection() as conn:
            data = await views.load(conn, self.d.alert_cache)
            if f.active or after:
                data["jobs"], nxt = await console.find(conn, f, after)
            else:
                nxt = None
                if len(data["jobs"]) >= views.RECENT_LIMIT:
                    last = data["jobs"][-1]
                    nxt = console.Cursor(last["created_at"], last["id"])
        live = request.query_params.get("live") == "1"
        frags = views.fragments(data)
        stale_after = timedelta(seconds=round(self.d.settings.stale_after_seconds))
        return self.d.html(
            "jobs.html",
            who,
            **data,
            rows_html=views.rows(data["jobs"], "No job matches this filter." if f.active else ""),
            live=live,
            filtered=f.active or after is not None,
            filter=f,
            filter_query=f.query(),
            statuses=ops.STATUSES,
            ranges=console.RANGES,
            bulk_actions=console.bulk_actions(f),
            next_cursor=nxt.token() if nxt else None,
            paged=after is not None,
            limit=views.RECENT_LIMIT,
            updated=frags["updated"],
            stale_after=stale_after,
        )

    async def rows(self, request: Request, who: Principal) -> Response:
        """The list's rows for a filter, as the page's live refresh asks for them."""
        f = console.JobFilter.parse(request.query_params)
        after = console.Cursor.parse(request.query_params.get("after"))
        async with self.d.pool.connection() as conn:
            jobs, nxt = await console.find(conn, f, after)
        body = {"rows": views.rows(jobs, "No job matches this filter."), "count": len(jobs)}
        return harden(JSONResponse(body | {"next": nxt.token() if nxt else None}))

    async def job(self, request: Request, who: Principal) -> Response:
        job_id: UUID = request.path_params["id"]
        async with self.d.pool.connection() as conn:
            row = await console.job(conn, job_id)
        course, problem = await self._course(row)
        return self.d.html(
            "job.html",
            who,
            j=row,
            m=row["metrics"] if isinstance(row["metrics"], dict) else {},
            params_json=json.dumps(row["params"], indent=2, ensure_ascii=False),
            metrics_json=json.dumps(row["metrics"], indent=2, ensure_ascii=False),
            course=course,
            course_problem=problem,
            media=_media_type(row),
            next=f"{PAGE}/{job_id}",
            **views.ROW_CONTEXT,
        )

    async def _course(self, row: dict[str, Any]) -> tuple[Course | None, str]:
        """The stored course of a done course job, read through the storage the
        worker writes to; a reason instead when it cannot be shown."""
        if row["job_type"] != "course" or row["status"] != "done" or not row["result_path"]:
            return None, ""
        try:
            data = await self.d.storage.read(row["result_path"])
        except Exception as exc:  # storage is away or misconfigured: say so, keep the page
            return None, f"Could not read {row['result_path']}: {type(exc).__name__}"
        if data is None:
            return None, f"{row['result_path']} is not in storage (purged, or another STORAGE_URL?)"
        if len(data) > MAX_COURSE_BYTES:
            return None, f"{row['result_path']} is too large to show here"
        try:
            return Course.model_validate_json(data), ""
        except ValidationError:
            return None, f"{row['result_path']} is not a course this version can read"

    async def result(self, request: Request, who: Principal) -> Response:
        """A media job's file, for the page's <img> and <audio> (same origin, so
        the strict CSP holds)."""
        job_id: UUID = request.path_params["id"]
        async with self.d.pool.connection() as conn:
            row = await console.job(conn, job_id)
        media = _media_type(row)
        if media is None:
            raise JobNotFound(f"Job {job_id} has no image or audio to show")
        data = await self.d.storage.read(row["result_path"])
        if data is None:
            raise JobNotFound(f"{row['result_path']} is not in storage")
        response = Response(data, media_type=media)
        response.headers["Content-Disposition"] = "inline"
        return harden(response)

    async def overview(self, request: Request, who: Principal) -> Response:
        async with self.d.pool.connection() as conn:
            spend = await console.cost(conn)
            paused = await ops.paused(conn)
            workers = await _workers(conn, self.d.settings)
            batches = await console.open_batches(conn)
        return self.d.html(
            "overview.html",
            who,
            cost=spend,
            batches=batches,
            paused=paused,
            workers=workers,
            windows=list(console.CHART_WINDOWS),
        )

    async def charts(self, request: Request, who: Principal) -> Response:
        window = request.query_params.get("window", "hour")
        async with self.d.pool.connection() as conn:
            data = await console.charts(conn, window)
        return harden(JSONResponse(data))

    async def static(self, request: Request, who: Principal) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise JobNotFound(f"No static file {name!r}")
        data = resources.files("listener.web").joinpath("static", name).read_bytes()
        response = harden(Response(data, media_type=STATIC[name]))
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response


def _media_type(row: dict[str, Any]) -> str | None:
    path = row.get("result_path") or ""
    if row["job_type"] != "media" or row["status"] != "done" or "." not in path:
        return None
    return MEDIA_TYPES.get(path.rsplit(".", 1)[1].lower())


async def _workers(conn: Any, settings: Settings) -> list[WorkerRow] | None:
    """The live workers of the registry (sql/012)."""
    return await ops.workers(conn, live_seconds(settings))
