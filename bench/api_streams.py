"""A thousand open event streams on one `ai-jobs web`: its memory and CPU, and how
long a progress write takes to reach every stream.

    .venv/bin/python -m bench.api_streams [--streams 1000] [--rounds 10] [--users N]

A scratch database (created, migrated, dropped) holds one course job per stream,
each of its own user by default (the worst case: one read per user per change).
The real `ai-jobs web` serves the API; the streams are plain sockets in this
process reading server-sent events. Once every stream has its first event, the
jobs are claimed, then their progress is written for all of them in one
progress_jobs statement per second (as a worker does), and each stream notes
when the new percent arrives. Figures: the web process's RSS and CPU (from
/proc), idle and while the rounds run, and the latency from each write's commit
to each stream's event. Runs in the project's own virtualenv (`make install`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from bench.proc import cpu_seconds, rss_mb
from listener.migrate import migrate

SECRET = "bench-jwt-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ADMIN = "bench-admin-token-0123456789-abcdefghijklmnop"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user: uuid.UUID) -> str:
    now = int(time.time())
    claims = {"sub": str(user), "aud": "authenticated", "exp": now + 3600, "iat": now}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@dataclass
class Stream:
    job_id: str
    user: uuid.UUID
    first: asyncio.Event = field(default_factory=asyncio.Event)
    percents: dict[int, float] = field(default_factory=dict)  # percent -> arrival time
    writer: asyncio.StreamWriter | None = None


async def follow(s: Stream, port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    s.writer = writer
    writer.write(
        (
            f"GET /v1/jobs/{s.job_id}/events HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {token(s.user)}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"stream refused: {status!r}")
    while line := await reader.readline():
        if not line.startswith(b"data: "):
            continue
        job = json.loads(line[6:])
        now = time.monotonic()
        s.first.set()
        percent = (job.get("progress") or {}).get("percent")
        if isinstance(percent, int) and percent not in s.percents:
            s.percents[percent] = now


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98], "max": values[-1]}


async def run(server: str, streams: int, rounds: int, users: int) -> dict[str, Any]:
    name = f"aijobs_bench_api_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(server, autocommit=True)
    admin.execute(f'create database "{name}"')
    dsn = make_conninfo(server, dbname=name)
    proc: subprocess.Popen[bytes] | None = None
    try:
        await migrate(dsn)
        people = [uuid.uuid4() for _ in range(users)]
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            c.execute("update ai_job_settings set rate_limit_per_hour = 1000000")
            rows = c.execute(
                "insert into ai_course_jobs (subject, created_by)"
                " select 'subject ' || g, (%s::uuid[])[1 + g %% %s]"
                " from generate_series(0, %s - 1) g returning id, created_by",
                [people, users, streams],
            ).fetchall()
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "ADMIN_TOKEN": ADMIN,
            "JWT_SECRET": SECRET,
            "PORT": str(port),
            "API_STREAMS_PER_PROCESS": str(streams + 10),
            "API_STREAMS_PER_USER": str(streams),
            "LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen([sys.executable, "-m", "listener", "web"], env=env)  # noqa: ASYNC220 - started once, before the measurement
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("ai-jobs web did not start") from None
                await asyncio.sleep(0.1)
        base_rss = rss_mb(proc.pid)
        ss = [Stream(str(r["id"]), r["created_by"]) for r in rows]
        t0 = time.monotonic()
        tasks = [asyncio.create_task(follow(s, port)) for s in ss]
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in ss)), 120)
        opened = time.monotonic() - t0
        await asyncio.sleep(2)
        idle_cpu0, idle_t0 = cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(5)
        idle_cpu = (cpu_seconds(proc.pid) - idle_cpu0) / (time.monotonic() - idle_t0)
        open_rss = rss_mb(proc.pid)

        latencies: list[float] = []
        late: list[int] = []
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            claimed = c.execute(
                "select * from claim_jobs('ai_course_jobs', 'bench', %s)", [streams]
            )
            held = claimed.fetchall()
            ids = [h["id"] for h in held]
            toks = [h["claim_token"] for h in held]
            cpu0, busy_t0 = cpu_seconds(proc.pid), time.monotonic()
            for n in range(1, rounds + 1):
                percent = n * 100 // (rounds + 1)
                progress = json.dumps({"percent": percent, "phase": "generating", "tokensOut": n})
                c.execute(
                    "select count(*) from progress_jobs('ai_course_jobs', %s, %s, %s::jsonb[])",
                    [ids, toks, [progress] * len(ids)],
                )
                committed = time.monotonic()
                await asyncio.sleep(1.0)
                missing = 0
                for s in ss:
                    at = s.percents.get(percent)
                    if at is None:
                        missing += 1
                    else:
                        latencies.append(at - committed)
                late.append(missing)
            busy_cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - busy_t0)
            busy_rss = rss_mb(proc.pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in ss:
            if s.writer is not None:
                s.writer.close()
        return {
            "streams": streams,
            "users": users,
            "rounds": rounds,
            "open_seconds": round(opened, 2),
            "rss_mb": {
                "started": round(base_rss, 1),
                "streams_open": round(open_rss, 1),
                "after_rounds": round(busy_rss, 1),
            },
            "cpu_percent": {
                "idle": round(100 * idle_cpu, 1),
                "progress_rounds": round(100 * busy_cpu, 1),
            },
            "latency_ms": {k: round(v * 1000, 1) for k, v in quantiles(latencies).items()},
            "events_late_over_1s": sum(late),
        }
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        admin.execute(f'drop database if exists "{name}" with (force)')
        admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=os.environ.get("TEST_DATABASE_URL", DEFAULT_SERVER))
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--users", type=int, default=0, help="users owning the jobs (0: one per stream)"
    )
    args = ap.parse_args()
    assert conninfo_to_dict(args.server)
    result = asyncio.run(run(args.server, args.streams, args.rounds, args.users or args.streams))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
