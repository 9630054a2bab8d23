"""`ai-jobs demo`: everything on one machine with no set-up. An embedded
PostgreSQL (unless DATABASE_URL is set), the worker in-process with the
placeholder provider, a handful of jobs with live progress; then a summary."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from listener import dal, embedded, logs, ops
from listener.app import open_worker
from listener.errors import ConfigError
from listener.migrate import migrate
from listener.rows import DemoJobRow
from listener.settings import Settings

DEMO_DIR = Path(".demo")
# The demo extra, as installed from PyPI and from a checkout of the repository.
DEMO_INSTALL = "pip install 'ai-jobs[demo]' (from a checkout: pip install '.[demo]')"
DEMO_DB = "ai_jobs_demo"
COURSES: list[tuple[str, dict[str, Any]]] = [
    ("Algebra Basics", {"itemsPerGroup": 6, "level": "beginner"}),
    ("Photosynthesis", {"level": "intermediate"}),
    ("The French Revolution", {"language": "en"}),
    ("Introduction to Python", {"itemsPerGroup": 8}),
    ("Music Theory", {}),
]
MEDIA = [("A watercolor lighthouse at dawn", "image"), ("Welcome to Algebra Basics", "audio")]
# The placeholder provider fails on request: this job shows retries with
# backoff ending in the dead letter.
FAILING: tuple[str, dict[str, Any]] = (
    "Quantum Gravity",
    {"simulateFailure": "the provider is down (simulated)"},
)
FINAL = {"done", "dead_letter"}
COLORS = {
    "pending": "yellow",
    "processing": "cyan",
    "done": "green",
    "failed": "red",
    "dead_letter": "bold red",
    "stale": "magenta",
}


@contextlib.contextmanager
def database(settings: Settings, console: Console) -> Iterator[str]:
    """The demo database: DATABASE_URL's server, or an embedded PostgreSQL whose
    data stays in .demo/pgdata for the next run; stopped on the way out."""
    if settings.dsn:
        yield settings.dsn
        return
    try:
        get_server = embedded.server_factory()
    except ModuleNotFoundError:
        raise ConfigError(
            f"the demo's embedded PostgreSQL is not installed: {DEMO_INSTALL} "
            "(or set DATABASE_URL to a scratch database)"
        ) from None

    DEMO_DIR.mkdir(exist_ok=True)
    console.print("[dim]starting an embedded PostgreSQL in .demo/pgdata ...[/dim]")
    server = get_server(DEMO_DIR.resolve() / "pgdata", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        console.print("[dim]embedded PostgreSQL stopped[/dim]")


def _fresh_database(server_dsn: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(dal.DEMO_DROP_DATABASE.sql)
        conn.execute(dal.DEMO_CREATE_DATABASE.sql)
    params = conninfo_to_dict(server_dsn)
    params["dbname"] = DEMO_DB
    return make_conninfo("", **params)


def demo_settings(base: Settings, dsn: str) -> Settings:
    return base.model_copy(
        update={
            "database_url": SecretStr(dsn),
            "allow_placeholder": True,
            "placeholder_delay_ms": base.placeholder_delay_ms or 700,
            "retry_base_seconds": min(base.retry_base_seconds, 0.5),
            "storage_url": str((DEMO_DIR / "storage").resolve())
            if base.storage_url == ".storage"
            else base.storage_url,
        }
    )


async def _enqueue(conn: Any) -> list[UUID]:
    ids = [await ops.enqueue_course(conn, subject, params=params) for subject, params in COURSES]
    ids += [await ops.enqueue_media(conn, prompt, kind) for prompt, kind in MEDIA]
    ids.append(await ops.enqueue_course(conn, FAILING[0], params=FAILING[1], max_retries=3))
    return ids


def _render(rows: list[DemoJobRow], progress: Progress, task: Any) -> Group:
    table = Table(expand=True, header_style="bold")
    for col in ("type", "job", "status", "attempts", "seconds", "result / error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        color = COLORS.get(r["status"], "white")
        note = r["result_path"] or (r["error"] or "")
        table.add_row(
            r["kind"],
            r["title"],
            f"[{color}]{r['status']}[/{color}]",
            f"{r['retry_count']}/{r['max_retries']}",
            str(r["seconds"] or ""),
            note,
        )
    progress.update(task, completed=sum(r["status"] in FINAL for r in rows), total=len(rows))
    return Group(progress, table)


async def run_demo(base: Settings, serve: bool, console: Console) -> int:
    if "LOG_LEVEL" not in os.environ:  # the live table tells the story; logs would garble it
        logs.setup(base.log_format, "CRITICAL", base.secrets())
    with database(base, console) as server_dsn:
        dsn = _fresh_database(server_dsn) if not base.dsn else server_dsn
        settings = demo_settings(base, dsn)
        await migrate(
            dsn,
            rate_limit_per_hour=settings.rate_limit_per_hour,
            request_limits=settings.request_limits(),
        )
        async with open_worker(settings, app="ai-jobs demo") as worker:
            worker_task = asyncio.create_task(worker.run())
            try:
                async with worker.pool.connection() as conn:
                    ids = await _enqueue(conn)
                rows = await _watch(worker.pool, ids, console)
                if serve:
                    _summary(rows, settings, console)
                    await _serve(settings, console)
            finally:
                worker.request_stop()
                await worker_task
        # (the catalog got its last render as the worker's handlers closed)
        if not serve:
            _summary(rows, settings, console)
        expected = {r["id"]: "dead_letter" if r["title"] == FAILING[0] else "done" for r in rows}
        return 0 if all(r["status"] == expected[r["id"]] for r in rows) else 1


async def _watch(pool: Any, ids: list[UUID], console: Console) -> list[DemoJobRow]:
    progress = Progress(
        TextColumn("[bold]jobs finished"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("jobs", total=None)
    rows: list[DemoJobRow] = []
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            async with pool.connection() as conn:
                rows = await dal.DEMO_JOBS.all(conn, {"ids": ids})
            live.update(_render(rows, progress, task))
            if rows and all(r["status"] in FINAL for r in rows):
                return rows
            await asyncio.sleep(0.2)


def _summary(rows: list[DemoJobRow], settings: Settings, console: Console) -> None:
    done = sum(r["status"] == "done" for r in rows)
    dead = sum(r["status"] == "dead_letter" for r in rows)
    root = settings.storage_root
    console.print(
        f"\n[bold green]{done} done[/], [bold red]{dead} in the dead letter[/] "
        f"(the one asked to fail), of {len(rows)} jobs."
    )
    console.print(f"Results under [bold]{root}[/]: courses/<courseId>/course.json, media/<jobId>.*")
    catalog = root / "courses" / "catalog.json"
    if catalog.exists():
        console.print(f"Catalog: [bold]{catalog}[/]")


async def _serve(settings: Settings, console: Console) -> None:
    token = (
        settings.admin_token.get_secret_value()
        if settings.admin_token
        else secrets.token_urlsafe(32)
    )
    try:
        serve = importlib.import_module("listener.web.server").serve
    except (ImportError, AttributeError):
        console.print("[yellow]the dashboard is not available in this build; worker only[/]")
        await asyncio.Event().wait()
        return
    console.print(
        f"\nDashboard: [bold]http://127.0.0.1:{settings.port}/admin/jobs?live=1[/]"
        f"  token: [bold]{token}[/]   (Ctrl-C stops everything)"
    )
    # The dashboard's server owns SIGINT from here: Ctrl-C ends it, then the demo
    # stops the worker and the embedded PostgreSQL.
    await serve(settings.model_copy(update={"admin_token": SecretStr(token)}), host="127.0.0.1")
