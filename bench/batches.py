"""Batch jobs, measured on the fake providers:

    .venv/bin/python -m bench.batches [--jobs 300] [--watch 100] [--seconds 120]

1. Cost per course, batch against direct: a scratch database (created,
   migrated, dropped), the real `ai-jobs worker` against the fake providers
   (usage counted at 4 characters a token, the pricing table's prices), half the
   jobs inserted with `batch = true`; once every job is done, `ai-jobs costs --by
   model --json` gives the cost per job of each kind.
2. The database load of watching `--watch` open batches: that many batches of 5
   jobs each, open at the fake (which never ends them), recorded as if their
   worker had died; a fresh worker with the default settings takes them over,
   then its transactions (each of its statements is one) and rows written per
   minute are read from pg_stat_database / pg_stat_user_tables over
   `--seconds`, against the same worker with no batch (the baseline). The fake's
   count of batch retrievals gives the provider polls per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import openai
import psycopg
from psycopg.rows import dict_row

from bench.pgserver import server
from bench.queries import sql
from listener.migrate import migrate
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI, running
from tests.helpers import AI_JOBS, env


def worker(dsn: str, fake: FakeAI, **extra: str) -> subprocess.Popen[bytes]:
    settings = {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "ALLOW_PLACEHOLDER": "0",
        "CACHE_TTL_SECONDS": "0",
        "STORAGE_URL": tempfile.mkdtemp(),
        "WORKER_CONCURRENCY": "10",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    return subprocess.Popen(
        [*AI_JOBS, "worker"], env=env(dsn, **settings), stdout=subprocess.DEVNULL
    )


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait(60)


def cost_run(dsn: str, fake: FakeAI, jobs: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        c.execute(sql("batches_settings"))
        c.execute(sql("batches_insert_course"), {"prefix": "b", "n": jobs // 2, "batch": True})
        c.execute(
            sql("batches_insert_course"), {"prefix": "d", "n": jobs - jobs // 2, "batch": False}
        )
    t0 = time.monotonic()
    w = worker(dsn, fake, BATCH_COLLECT_SECONDS="5", BATCH_POLL_SECONDS="2")
    try:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
            while (c.execute(sql("batches_left")).fetchone() or {"n": 1})["n"]:
                if time.monotonic() - t0 > 600:
                    raise SystemExit("the jobs did not finish within 10 minutes")
                time.sleep(0.5)
    finally:
        stop(w)
    elapsed = time.monotonic() - t0
    out = subprocess.run(
        [*AI_JOBS, "costs", "--by", "model", "--json"],
        env=env(dsn),
        check=True,
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.stdout)["rows"]
    for r in rows:
        r["costPerJobUsd"] = round(r["costUsd"] / r["jobs"], 6) if r["jobs"] else None
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 1),
        "batches_created": dict(fake.batches.created),
        "costs": rows,
    }


def counters(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        row = c.execute(sql("batches_db_counters")).fetchone() or {}
    return {"xacts": int(row["xacts"]), "rows_written": int(row["rows_written"])}


def polls_of(fake: FakeAI) -> int:
    """The fake's batch retrievals (GET /v1/batches/{id}) so far."""
    with fake.lock:
        return sum(1 for r in fake.requests if r.method == "GET" and "/v1/batches/" in r.path)


def load(dsn: str, fake: FakeAI, seconds: float) -> dict[str, float]:
    """A worker's transactions and rows written per minute, after its start."""
    w = worker(dsn, fake)
    try:
        time.sleep(30)  # started, its open batches taken over (20 a tick)
        polls0 = polls_of(fake)
        a = counters(dsn)
        time.sleep(seconds)
        b = counters(dsn)
        polls = polls_of(fake) - polls0
    finally:
        stop(w)
    per_min = 60 / seconds
    return {
        "statements_per_min": round((b["xacts"] - a["xacts"]) * per_min, 1),
        "rows_written_per_min": round((b["rows_written"] - a["rows_written"]) * per_min, 1),
        "provider_polls_per_min": round(polls * per_min, 1),
    }


def watch_run(dsn: str, fake: FakeAI, batches: int, seconds: float) -> dict[str, Any]:
    baseline = load(dsn, fake, seconds)
    fake.batches.delay = 10**9  # never ends
    client = openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=fake.openai_url, max_retries=0)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        for _ in range(batches):
            jobs = c.execute(sql("batches_open_jobs"), {"n": 5}).fetchall()
            line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}
            f = client.files.create(
                file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch"
            )
            pb = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            bid = uuid.uuid4()
            c.execute(sql("batches_open_batch"), {"id": bid, "provider_batch": pb.id})
            for j in jobs:
                c.execute(
                    sql("batches_open_item"),
                    {"batch": bid, "id": j["id"], "token": j["claim_token"]},
                )
    watched = load(dsn, fake, seconds)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as c:
        held = (c.execute(sql("batches_held")).fetchone() or {"n": 0})["n"]
    return {"batches": batches, "held_at_end": held, "baseline": baseline, "watching": watched}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batches", description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--watch", type=int, default=100)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--skip-cost", action="store_true")
    args = p.parse_args(argv)
    report: dict[str, Any] = {}
    with server() as srv:
        for part in ("cost", "watch"):
            if part == "cost" and args.skip_cost:
                continue
            name = f"bench_batches_{part}_{os.getpid()}"
            dsn = srv.create_database(name)
            try:
                asyncio.run(migrate(dsn))
                with running(fixed_usage=False) as fake:
                    if part == "cost":
                        report["cost"] = cost_run(dsn, fake, args.jobs)
                    else:
                        report["watch"] = watch_run(dsn, fake, args.watch, args.seconds)
            finally:
                srv.drop_database(name)
            print(json.dumps({part: report.get(part)}, indent=1), flush=True)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
