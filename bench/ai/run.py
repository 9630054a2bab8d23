"""One configuration's run: a fresh database and a fresh fake, the workers, the
crowd inserted on its schedule for `load.minutes` quota minutes, what the
processes and the database did meanwhile, and every job's times."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pgserver
from bench.ai import load as L
from bench.ai import procs
from bench.queries import sql

# main before issue 22: the first parent of the merge that brought provider quotas
BASE_REV = "e0b6878"


@dataclass(frozen=True)
class Config:
    name: str
    system: str  # "ai-jobs" (this checkout, or `rev`), "base" (BASE_REV's ai-jobs), "pgqueuer"
    workers: int
    limits: float = 0.0  # PROVIDER_LIMITS at this share of the provider's quota (0: unset)
    fair: bool = False  # max_running_per_user set, where the schema has it
    rev: str | None = None  # "ai-jobs" at this commit instead of this checkout
    slots: int = 0  # pgqueuer: this concurrency_limit instead of one from `limits`
    scenario: str = ""  # one of load.SCENARIOS: the conditions the run meets

    @property
    def tag(self) -> str:
        cap = f"_cap{round(self.limits * 100)}" if self.limits else ""
        cap += f"_s{self.slots}" if self.slots else ""
        cap += f"_{self.scenario}" if self.scenario else ""
        return f"{self.system.replace('-', '')}_{self.workers}w{cap}"


@dataclass
class JobRec:
    user: str
    created: float
    started: float | None
    completed: float | None
    status: str  # done, dead_letter, or anything else (not finished)
    out_tokens: int = 0
    in_tokens: int = 0
    failed_attempts: int = 0


@dataclass
class Outcome:
    config: Config
    t0: float
    t_end: float
    jobs: list[JobRec]
    fake: dict[str, Any]
    cpu_s: float
    rss_mb: float
    in_flight: list[tuple[float, int]]  # (time, calls in flight at the fake)
    commits: float
    rollbacks: float
    bench_txns: int  # the bench's own transactions among them (its inserts)
    user_cap: int | None
    notes: list[str] = field(default_factory=list)


async def run(
    config: Config, load: L.Load, crowd: L.Crowd, srv: pgserver.Server, keep: bool = False
) -> Outcome:
    """`keep`: leave the scratch folder (the workers' and the fake's logs)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"ai-jobs-bench-ai-{config.tag}-"))
    dbname = f"benchai_{config.tag}"
    url = srv.create_database(dbname)
    trace = ["--log", str(scratch / "requests.jsonl")] if keep else []
    fake = procs.Fake(load.fake_args() + trace, scratch / "fake.log")
    workers: procs.Workers | None = None
    try:
        if config.system == "pgqueuer":
            workers, user_cap = await _start_pgqueuer(config, load, url, fake.url, scratch)
        else:
            workers, user_cap = await _start_ai_jobs(config, load, url, fake.url, scratch)
        return await _drive(config, load, crowd, url, fake, workers, scratch, user_cap, keep)
    finally:
        if workers is not None:
            workers.stop()
        if fake.proc.poll() is None:
            fake.stop()
        srv.drop_database(dbname)
        if keep:
            print(f"  kept {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def user_cap(load: L.Load) -> int:
    """The per-user cap of "fairness on": the calls the quota keeps in flight, so
    that a user alone still gets the whole quota (the cap bites only when others
    wait; the fair order does the rest)."""
    return math.ceil(load.in_flight)


async def _start_ai_jobs(
    config: Config, load: L.Load, url: str, fake: str, scratch: Path
) -> tuple[procs.Workers, int | None]:
    if config.system == "base":
        checkout = procs.base_checkout(BASE_REV)
    else:
        checkout = procs.base_checkout(config.rev) if config.rev else procs.ROOT
    await asyncio.to_thread(procs.migrate, checkout, url)
    cap = None
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(sql("ai_unlimited_inserts"))
        row = await (await conn.execute(sql("ai_has_user_cap"))).fetchone()
        if config.fair and row and row["present"]:
            cap = user_cap(load)
            await conn.execute(sql("ai_set_user_cap"), {"cap": cap})
    s = load.scale
    extra = {
        "WORKER_CONCURRENCY": str(L.CONCURRENCY),
        "AI_MAX_OUTPUT_TOKENS": str(L.MAX_OUTPUT),
        "AI_TIMEOUT_SECONDS": f"{L.AI_TIMEOUT / s:g}",
        "PROVIDER_BREAKER_COOLDOWN_SECONDS": f"{L.BREAKER_COOLDOWN / s:g}",
        "RETRY_BASE_SECONDS": f"{L.RETRY_BASE / s:g}",
        "SHUTDOWN_GRACE_SECONDS": "1",
        "STORAGE_URL": str(scratch / "storage"),
    }
    if config.limits:
        rpm, tpm = round(load.rpm * config.limits), round(load.tpm * config.limits)
        extra["PROVIDER_LIMITS"] = f"openai=rpm:{rpm},tpm:{tpm}"
    env = procs.ai_jobs_env(url, fake, extra)
    workers = procs.start_ai_jobs(checkout, config.workers, env, scratch)
    deadline = time.monotonic() + 90
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        while True:
            workers.check_alive()
            row = await (await conn.execute(sql("ai_workers_alive"))).fetchone()
            if row and row["n"] >= config.workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not registered in 90 s: see {scratch}")
            await asyncio.sleep(0.2)
    return workers, cap


def pgqueuer_limit(load: L.Load, limits: float = 1.0, slots: int = 0) -> int:
    """pgqueuer's concurrency_limit for the key's stated quota: the calls it keeps
    in flight (Little's law, rounded down; `slots` when given)."""
    return slots or max(1, math.floor(load.in_flight * limits))


async def _start_pgqueuer(
    config: Config, load: L.Load, url: str, fake: str, scratch: Path
) -> tuple[procs.Workers, int | None]:
    from bench.systems import pgqueuer_sys

    await pgqueuer_sys.prepare(url)
    s = load.scale
    args = [
        "--url", url, "--fake", fake,
        "--limit", str(pgqueuer_limit(load, config.limits or 1.0, config.slots)),
        "--max-tasks", str(L.CONCURRENCY),
        "--timeout", f"{L.AI_TIMEOUT / s:g}",
        "--max-output", str(L.MAX_OUTPUT),
        "--retry-base", f"{L.RETRY_BASE / s:g}",
        "--storage", str(scratch / "storage"),
    ]  # fmt: skip
    workers = await asyncio.to_thread(
        procs.start_pgqueuer, config.workers, args, scratch / "records.jsonl", scratch
    )
    return workers, None


class _Inserter:
    """The crowd's inserts, in the system's own way (one transaction each)."""

    def __init__(self, config: Config, url: str) -> None:
        self.config, self.url = config, url
        self.n = 0
        self.txns = 0
        self.created: dict[int, tuple[str, float]] = {}  # pgqueuer: n -> (user, time)
        self.conn: Any = None

    async def open(self) -> None:
        if self.config.system == "pgqueuer":
            import asyncpg
            from pgqueuer.db import AsyncpgDriver
            from pgqueuer.queries import Queries

            from bench.systems.pgqueuer_sys import _dsn

            self.conn = await asyncpg.connect(_dsn(self.url))
            self.queries = Queries(AsyncpgDriver(self.conn))
        else:
            self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def insert(self, users: list[str]) -> None:
        ns = list(range(self.n, self.n + len(users)))
        self.n += len(users)
        subjects = [f"Bench subject {n}" for n in ns]
        self.txns += 1
        if self.config.system == "pgqueuer":
            from bench.ai.pgq_worker import ENTRYPOINT

            payloads = [
                json.dumps(
                    {"n": n, "user": u, "subject": s, "course_id": f"bench-subject-{n}"}
                ).encode()
                for n, u, s in zip(ns, users, subjects, strict=True)
            ]
            await self.queries.enqueue([ENTRYPOINT] * len(ns), payloads, [0] * len(ns))
            now = time.time()
            for n, u in zip(ns, users, strict=True):
                self.created[n] = (u, now)
        else:
            await self.conn.execute(sql("ai_insert_jobs"), {"subjects": subjects, "users": users})

    async def close(self) -> None:
        await self.conn.close()


async def _counters(url: str) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        row = await (await conn.execute(sql("ai_db_counters"))).fetchone()
        return dict(row or {})


async def _drive(
    config: Config,
    load: L.Load,
    crowd: L.Crowd,
    url: str,
    fake: procs.Fake,
    workers: procs.Workers,
    scratch: Path,
    cap: int | None,
    keep: bool = False,
) -> Outcome:
    ins = _Inserter(config, url)
    quotas = (scratch / "quotas.jsonl").open("w") if keep and config.system == "ai-jobs" else None
    await ins.open()
    c0 = await _counters(url)
    workers.start_cpu()
    t0 = time.time()
    await ins.insert([crowd.heavy] * load.heavy_jobs)
    pending = list(crowd.arrivals)
    in_flight: list[tuple[float, int]] = []
    rss = 0.0
    next_sample = time.time()
    while (now := time.time()) < t0 + load.seconds:
        due = [u for t, u in pending if t0 + t <= now]
        if due:
            pending = pending[len(due) :]
            await ins.insert(due)
        if now >= next_sample:
            next_sample += 1.0
            workers.check_alive()
            in_flight.append((now, int(fake.stats().get("in_flight", 0))))
            rss = max(rss, workers.sample()[1])
        if quotas is not None:
            rows = await (await ins.conn.execute(sql("ai_quota_rows"))).fetchall()
            quotas.write(json.dumps({"t": time.time(), "rows": rows}) + "\n")
        nxt = min([t0 + pending[0][0]] if pending else [], default=next_sample)
        await asyncio.sleep(max(0.0, min(nxt, next_sample, time.time() + 0.25) - time.time()))
    t_end = time.time()
    if quotas is not None:
        quotas.close()
    cpu, last_rss = workers.sample()
    rss = max(rss, last_rss)
    stats = fake.stats()
    await ins.close()
    workers.stop()
    await asyncio.sleep(1.0)  # the backends' statistics reach pg_stat_database as they end
    c1 = await _counters(url)
    jobs = await _jobs(config, url, ins, scratch)
    return Outcome(
        config=config,
        t0=t0,
        t_end=t_end,
        jobs=jobs,
        fake=stats,
        cpu_s=cpu,
        rss_mb=rss,
        in_flight=in_flight,
        commits=c1.get("commits", 0) - c0.get("commits", 0),
        rollbacks=c1.get("rollbacks", 0) - c0.get("rollbacks", 0),
        bench_txns=ins.txns + 1,  # and the counters' own read
        user_cap=cap,
    )


async def _jobs(config: Config, url: str, ins: _Inserter, scratch: Path) -> list[JobRec]:
    if config.system != "pgqueuer":
        async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
            rows = await (await conn.execute(sql("ai_jobs"))).fetchall()
        return [
            JobRec(
                user=r["user_id"],
                created=r["created"],
                started=r["started"],
                completed=r["completed"],
                status=r["status"],
                out_tokens=r["out_tokens"],
                in_tokens=r["in_tokens"],
                failed_attempts=r["retry_count"],
            )
            for r in rows
        ]
    last: dict[int, dict[str, Any]] = {}
    failed: dict[int, int] = {}
    path = scratch / "records.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        last[r["n"]] = r
        if r["outcome"] in ("error", "dead"):
            failed[r["n"]] = failed.get(r["n"], 0) + 1
    out = []
    for n, (user, created) in ins.created.items():
        r = last.get(n)
        status = {"done": "done", "dead": "dead_letter"}.get(r["outcome"], "pending") if r else ""
        out.append(
            JobRec(
                user=user,
                created=created,
                started=r["started"] if r and status == "done" else None,
                completed=r["ended"] if r and status in ("done", "dead_letter") else None,
                status=status or "pending",
                out_tokens=int(r["out_tokens"]) if r else 0,
                in_tokens=int(r.get("in_tokens", 0)) if r else 0,
                failed_attempts=failed.get(n, 0),
            )
        )
    return out
