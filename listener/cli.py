"""The `ai-jobs` command line: parse, call, print.

Exit status: 0 success, 1 error (one line on stderr), 2 bad usage (argparse).
Results go to stdout alone; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any
from uuid import UUID

from listener import db, logs, ops, params
from listener import settings as settings_mod
from listener.errors import AiJobsError, InvalidJob, translate
from listener.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
_COMMANDS: dict[str, Handler] = {}
MAX_LIMIT = 1_000_000  # rows `ai-jobs jobs --limit` may ask for


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return register


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers], *[[_printable(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def print_rows(as_json: bool, headers: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A runbook function's rows: JSON, or a table in the function's column order."""
    if as_json:
        print_json(rows)
    else:
        print_table(headers, [list(r.values()) for r in rows])


def print_json(data: Any) -> None:
    print(json.dumps(data, default=str))


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _not_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}: {text!r}")
        return value

    return parse


def _param(text: str) -> tuple[str, Any]:
    try:
        return ops.parse_param(text)
    except InvalidJob as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _check_params(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """After parsing: the params as the worker's handler would read them, or
    the usage error (exit 2) that says what it would refuse."""

    def check(args: argparse.Namespace) -> None:
        try:
            params.check(args.kind, dict(args.param or []))
        except InvalidJob as exc:
            parser.error(exc.message)

    return check


# -- commands ---------------------------------------------------------------


@command("migrate")
async def _migrate(args: argparse.Namespace, s: Settings) -> int:
    from listener.migrate import migrate

    applied = await migrate(
        db.require_dsn(s.dsn),
        rate_limit_per_hour=s.rate_limit_per_hour,
        request_limits=s.request_limits(),
        write_settings=args.write_settings,
        daily_budget_usd_per_user=s.daily_budget_usd_per_user,
    )
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


@command("enqueue")
async def _enqueue(args: argparse.Namespace, s: Settings) -> int:
    options = dict(args.param or [])  # checked by _check_params
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        if args.kind == "course":
            job_id = await ops.enqueue_course(
                conn, args.subject, user=args.user, params=options, max_retries=s.max_retries
            )
        else:
            job_id = await ops.enqueue_media(
                conn,
                args.prompt,
                args.media_type,
                user=args.user,
                params=options,
                max_retries=s.max_retries,
            )
    print(job_id)
    return 0


@command("status")
async def _status(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        depth = await ops.queue_depth(conn)
        paused = await ops.paused(conn)
    if args.json:
        print_json({**depth, "paused": paused})
    else:
        columns = [
            *ops.STATUSES,
            *([ops.OTHER] if any(ops.OTHER in d for d in depth.values()) else []),
        ]
        print_table(
            ["table", *columns, "claiming"],
            [
                [t, *(depth[t].get(c, 0) for c in columns), "PAUSED" if paused[t] else "yes"]
                for t in ops.TABLES
            ],
        )
    return 0


@command("cancel")
async def _cancel(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        table, was = await ops.cancel(conn, args.id, args.table)
    print(f"cancelled {args.id} in {table} (was {was})")
    return 0


@command("pause")
async def _pause(args: argparse.Namespace, s: Settings) -> int:
    table = ops.JOB_TYPES[args.job_type]
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        changed = await ops.set_paused(conn, table, True)
    print(f"paused {args.job_type} ({table})" + ("" if changed else ": it already was"))
    return 0


@command("resume")
async def _resume(args: argparse.Namespace, s: Settings) -> int:
    table = ops.JOB_TYPES[args.job_type]
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        changed = await ops.set_paused(conn, table, False)
    print(f"resumed {args.job_type} ({table})" + ("" if changed else ": it was not paused"))
    return 0


@command("requeue")
async def _requeue(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        table = await ops.requeue(conn, args.id, args.table)
    print(f"requeued {args.id} in {table}")
    return 0


@command("mark-stale")
async def _mark_stale(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.mark_stale(conn, s.stale_after_seconds)
    print_rows(args.json, ["job_id", "job_type", "stale_duration"], rows)
    return 0


@command("dead-letter")
async def _dead_letter(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.dead_letter(conn)
    print_rows(args.json, ["job_id", "job_type", "retry_count"], rows)
    return 0


@command("purge")
async def _purge(args: argparse.Namespace, s: Settings) -> int:
    days = args.days if args.days is not None else s.retention_days
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        deleted = await ops.purge(conn, days)
    print(deleted)
    return 0


@command("check-providers")
async def _check_providers(args: argparse.Namespace, s: Settings) -> int:
    from listener.providers import NO_PROVIDER
    from listener.providers.check import check_providers

    checks = await check_providers(s)
    print_table(
        ["provider", "model", "status", "detail"],
        [[c.provider, c.model, c.status, c.detail] for c in checks],
    )
    failed = [f"{c.provider} ({c.detail})" for c in checks if c.failed]
    if failed:
        raise AiJobsError("provider check failed: " + ", ".join(failed))
    if all(c.status == "not configured" for c in checks):
        raise AiJobsError(NO_PROVIDER)
    return 0


@command("stuck")
async def _stuck(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.stuck(conn, s.stale_after_seconds)
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["table", "id", "subject/prompt", "last_heartbeat", "stale_for", "worker"],
            [
                [
                    r["job_table"],
                    r["id"],
                    _clip(r["label"]),
                    r["last_heartbeat"],
                    r["stale_for"],
                    r["worker_id"],
                ]
                for r in rows
            ],
        )
    return 0


@command("alerts")
async def _alerts(args: argparse.Namespace, s: Settings) -> int:
    from listener import alerts

    async with db.connection(db.require_dsn(s.dsn)) as conn:
        # Sampling here too lets a cron job alone track the rejection rate.
        await alerts.record_samples(conn)
        found = await alerts.evaluate(conn, s)
    if args.json:
        print_json({"alerts": [a.as_dict() for a in found]})
    else:
        print_table(
            ["rule", "severity", "state", "value", "threshold"],
            [
                [
                    a.rule,
                    a.severity,
                    "FIRING" if a.firing else "ok",
                    "n/a" if a.value is None else a.value,
                    a.threshold,
                ]
                for a in found
            ],
        )
    return 1 if alerts.any_critical(found) else 0


@command("jobs")
async def _jobs(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.list_jobs(conn, args.status, args.limit)
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["table", "id", "subject/prompt", "status", "retries", "heartbeat_age", "error"],
            [
                [
                    r["job_table"],
                    r["id"],
                    _clip(r["label"]),
                    r["status"],
                    f"{r['retry_count']}/{r['max_retries']}",
                    r["heartbeat_age"],
                    _clip(r["error"], 60),
                ]
                for r in rows
            ],
        )
    return 0


@command("rate-limit")
async def _rate_limit(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.rate_limit_usage(conn)
    if args.json:
        print_json(rows)
    else:
        print_table(
            ["table", "user", "jobs_last_hour", "limit", "at_limit"],
            [
                [
                    r["job_table"],
                    r["created_by"],
                    r["jobs_last_hour"],
                    r["rate_limit"],
                    "yes" if r["jobs_last_hour"] >= r["rate_limit"] else "",
                ]
                for r in rows
            ],
        )
    return 0


@command("costs")
async def _costs(args: argparse.Namespace, s: Settings) -> int:
    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.costs(conn, args.days, args.by)
    if args.json:
        print_json(
            {
                "days": args.days,
                "by": args.by,
                "rows": [
                    {
                        args.by: r["key"],
                        "jobs": r["jobs"],
                        "inputTokens": r["input_tokens"],
                        "cachedInputTokens": r["cached_input_tokens"],
                        "outputTokens": r["output_tokens"],
                        "costUsd": r["cost_usd"],
                        "unpricedJobs": r["unpriced"],
                    }
                    for r in rows
                ],
                "totalCostUsd": round(sum(r["cost_usd"] for r in rows), 6),
            }
        )
    else:
        print_table(
            [args.by, "jobs", "input", "cached", "output", "cost_usd", "unpriced"],
            [
                [
                    r["key"],
                    r["jobs"],
                    r["input_tokens"],
                    r["cached_input_tokens"],
                    r["output_tokens"],
                    f"{r['cost_usd']:.4f}",
                    r["unpriced"] or "",
                ]
                for r in rows
            ],
        )
    return 0


@command("workers")
async def _workers(args: argparse.Namespace, s: Settings) -> int:
    from listener.registry import live_seconds

    async with db.connection(db.require_dsn(s.dsn)) as conn:
        rows = await ops.workers(conn, live_seconds(s))
    if args.json:
        print_json(rows)
    else:
        print_table(
            [
                "id",
                "host",
                "pid",
                "started",
                "last_seen",
                "listener",
                "jobs",
                "version",
                "probe_ms",
                "reconnects",
            ],
            [
                [
                    r["id"],
                    r["host"],
                    r["pid"],
                    r["started_at"].isoformat(timespec="seconds"),
                    f"{r['seen_seconds_ago']:g}s ago",
                    r["listener_state"],
                    r["jobs_running"],
                    r["version"],
                    "" if r["probe_seconds"] is None else f"{r['probe_seconds'] * 1000:.1f}",
                    r["reconnects"],
                ]
                for r in rows
            ],
        )
    return 0


@command("web")
async def _web(args: argparse.Namespace, s: Settings) -> int:
    from listener.web.server import serve

    await serve(s, host=args.host, port=args.port)
    return 0


def _printable(value: Any) -> str:
    """A cell on one line, without control characters: a subject, an error or a
    worker id may come from a client, and an escape sequence printed as is would
    drive the operator's terminal."""
    return "" if value is None else _CONTROL.sub("?", " ".join(str(value).split()))


def _clip(value: Any, width: int = 40) -> str:
    text = _printable(value)
    return text if len(text) <= width else text[: width - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


@command("worker")
async def _worker(args: argparse.Namespace, s: Settings) -> int:
    from listener.app import run_worker

    return await run_worker(s)


@command("run-once")
async def _run_once(args: argparse.Namespace, s: Settings) -> int:
    from listener.app import run_once

    code, result = await run_once(s, args.type)
    print_json(result)
    if code:
        status = result.get("status")
        # failed / dead_letter: the attempt failed; pending: it waits for its
        # providers (rate-limited or down), no attempt counted; cancelled: stopped.
        what = "failed" if status in ("failed", "dead_letter") else f"did not finish ({status})"
        print(f"ai-jobs: error: job {result['jobId']} {what}: {result['error']}", file=sys.stderr)
    return code


@command("demo")
async def _demo(args: argparse.Namespace, s: Settings) -> int:
    from rich.console import Console

    from listener.demo import run_demo

    return await run_demo(s, args.serve, Console())


# -- parser -----------------------------------------------------------------


# What each command does, for its `--help` (the one-line `help` is the list's).
DESCRIPTIONS = {
    "migrate": "Apply the migrations of sql/ and triggers/ that DATABASE_URL's database "
    "lacks, each once, in its own transaction; safe to run twice and from two processes "
    "at once. Settings kept in the database (the rate limit, the request limits, the "
    "daily budget) are written on first install only, unless --write-settings.",
    "worker": "Run the long-running worker: LISTEN on ai_jobs (or poll, LISTEN_MODE=poll), "
    "claim due jobs up to WORKER_CONCURRENCY, run them, sweep stale and failed jobs, and "
    "on SIGTERM finish or release what runs within SHUTDOWN_GRACE_SECONDS.",
    "run-once": "Claim one due job (of --type, or of either table), run it here and print "
    "the runbook's JSON result; exit 1 if it failed. The runbook's manual job trigger.",
    "enqueue": "Insert a job into ai_course_jobs (course) or ai_media_jobs (media) and "
    "print its id; the rate limit and the request limits apply as to any client.",
    "course": "Insert a course generation job for --subject and print its id.",
    "media": "Insert an image or audio generation job for --prompt and print its id.",
    "status": "Print the queue depth: jobs per table and status, and whether each job "
    "type is paused.",
    "requeue": "Put one job back to pending with its retries reset (requeue_job); "
    "without --table, whichever table holds it.",
    "cancel": "Cancel one pending, failed or running job (cancel_job); a running one is "
    "stopped by the worker that holds it.",
    "pause": "Pause a job type: every worker stops claiming it within a second; jobs "
    "running go on.",
    "resume": "Resume a paused job type: workers claim it again at once.",
    "mark-stale": "Mark processing jobs whose heartbeat is older than STALE_AFTER_SECONDS "
    "as stale (mark_stale_jobs) and print them.",
    "dead-letter": "Move failed jobs out of retries to the dead letter "
    "(move_to_dead_letter) and print them.",
    "stuck": "Print the processing jobs with a heartbeat older than STALE_AFTER_SECONDS "
    "(the runbook's 'find stuck jobs').",
    "alerts": "Evaluate the runbook's alert rules against the live database and print each "
    "one's value and state; exit 1 while a critical one fires.",
    "jobs": "Print recent jobs of a status (or every status), newest activity first, with "
    "their retries, heartbeat age and error.",
    "rate-limit": "Print each user's jobs of the last hour per table against the rate "
    "limit the database enforces.",
    "costs": "Print the tokens and USD spent by the done jobs of the last --days, from "
    "their metrics, per model, user or day.",
    "workers": "Print the live worker processes from the registry: host, pid, since when, "
    "last seen, listener state, jobs running, last probe, reconnects.",
    "web": "Serve the admin dashboard at /admin/jobs on PORT (needs ADMIN_TOKEN): live "
    "jobs, filters, actions, charts, workers and /metrics.",
    "demo": "Run everything on this machine with no set-up: an embedded PostgreSQL (unless "
    "DATABASE_URL is set), the placeholder provider, sample jobs with live progress; "
    "needs the demo extra: pip install 'ai-jobs[demo]' (from a checkout: pip install "
    "'.[demo]').",
    "purge": "Delete done and dead-letter jobs completed more than --days ago "
    "(purge_old_jobs) and print how many.",
    "check-providers": "Verify each configured AI provider key with one cheap call, as "
    "the runbook's curl checks do; exit 1 if one fails.",
}


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=DESCRIPTIONS[name])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ai-jobs",
        description="An event-driven job queue for AI generation work (courses, images, "
        "audio) on PostgreSQL LISTEN/NOTIFY. Every command reads its settings from the "
        "environment (DATABASE_URL first); `ai-jobs COMMAND --help` says what it does.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mg = _add(sub, "migrate", help="apply sql/ and triggers/ to DATABASE_URL")
    mg.add_argument(
        "--write-settings",
        action="store_true",
        help="write RATE_LIMIT_PER_HOUR, the request limits (MAX_SUBJECT_LENGTH, "
        "MAX_PROMPT_LENGTH, MAX_PARAMS_BYTES) and DAILY_BUDGET_USD_PER_USER (when set) into "
        "ai_job_settings even when the database has values (by default only when they are "
        "created, so that a limit changed live survives the migrate of every deploy)",
    )
    _add(sub, "worker", help="the long-running listener (Procfile worker:)")
    ro = _add(sub, "run-once", help="process one pending job now and print the result")
    ro.add_argument("--type", choices=["course", "media"])

    enq = _add(sub, "enqueue", help="insert a job and print its id")
    kinds = enq.add_subparsers(dest="kind", required=True, metavar="KIND")
    course = _add(kinds, "course", help="a course generation job")
    course.add_argument("--subject", required=True)
    media = _add(kinds, "media", help="a media generation job")
    media.add_argument("--prompt", required=True)
    media.add_argument("--media-type", required=True, choices=["image", "audio"])
    for k in (course, media):
        k.add_argument("--user", type=_uuid, help="the requesting user (rate-limit key)")
        k.add_argument(
            "--param",
            action="append",
            type=_param,
            metavar="K=V",
            help="handler option (V read as JSON when it is JSON), checked as the worker would",
        )
        k.set_defaults(check=_check_params(k))

    st = _add(sub, "status", help="queue depth per table and status")
    st.add_argument("--json", action="store_true")

    rq = _add(sub, "requeue", help="put one job back to pending")
    rq.add_argument("id", type=_uuid)
    rq.add_argument("--table", choices=ops.TABLES)

    cn = _add(sub, "cancel", help="cancel one job (a running one is stopped by its worker)")
    cn.add_argument("id", type=_uuid)
    cn.add_argument("--table", choices=ops.TABLES)
    for name, text in (
        ("pause", "every worker stops claiming this job type"),
        ("resume", "workers claim this job type again"),
    ):
        ps = _add(sub, name, help=text)
        ps.add_argument("job_type", choices=list(ops.JOB_TYPES), metavar="course|media")

    for name, text in (
        ("mark-stale", "processing jobs with an old heartbeat become stale"),
        ("dead-letter", "failed jobs out of retries go to the dead letter"),
    ):
        sp = _add(sub, name, help=text)
        sp.add_argument("--json", action="store_true")

    sk = _add(sub, "stuck", help="processing jobs with a stale heartbeat")
    sk.add_argument("--json", action="store_true")

    al = _add(sub, "alerts", help="the runbook's alert rules; exit 1 while a critical fires")
    al.add_argument("--json", action="store_true")

    jb = _add(sub, "jobs", help="jobs of a status, newest activity first, with errors")
    jb.add_argument("--status", choices=ops.STATUSES)
    jb.add_argument("--limit", type=_int_in(1, MAX_LIMIT), default=20, help="default 20")
    jb.add_argument("--json", action="store_true")

    rl = _add(sub, "rate-limit", help="jobs per user in the last hour against the limit")
    rl.add_argument("--json", action="store_true")

    co = _add(sub, "costs", help="tokens and USD spent by done jobs, from their metrics")
    co.add_argument("--days", type=_positive, default=7.0, help="created in the last N days (7)")
    co.add_argument("--by", choices=ops.COST_GROUPS, default="model", help="default model")
    co.add_argument("--json", action="store_true")

    wk = _add(sub, "workers", help="the live worker processes and their listeners")
    wk.add_argument("--json", action="store_true")

    wb = _add(sub, "web", help="the admin dashboard at /admin/jobs (needs ADMIN_TOKEN)")
    wb.add_argument("--host", default="0.0.0.0", help="default 0.0.0.0")
    wb.add_argument("--port", type=_int_in(1, 65535), help="default PORT (8000)")
    dm = _add(sub, "demo", help="everything on one machine: embedded PostgreSQL, sample jobs")
    dm.add_argument("--serve", action="store_true", help="keep the worker and dashboard running")

    pg = _add(sub, "purge", help="delete finished jobs older than --days")
    pg.add_argument("--days", type=_not_negative, help="default RETENTION_DAYS (90)")

    _add(sub, "check-providers", help="verify each configured AI provider key")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (check := getattr(args, "check", None)) is not None:
        check(args)  # a usage error exits 2, as argparse's own
    try:
        s = settings_mod.load()
        logs.setup(s.log_format, s.log_level, s.secrets())
        return asyncio.run(_COMMANDS[args.command](args, s))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback
        err = translate(exc) if not isinstance(exc, AiJobsError) else exc
        print(f"ai-jobs: error: {err.message}", file=sys.stderr)
        return 1
