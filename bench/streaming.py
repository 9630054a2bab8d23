"""Streaming and progress, measured (published in docs/benchmarks.md, "Streaming
and progress").

    .venv/bin/python -m bench.streaming parse
    .venv/bin/python -m bench.streaming run --jobs 1 --rounds 4
    .venv/bin/python -m bench.streaming run --jobs 500 [--no-progress]

`parse`: the incremental course reader (listener/course_stream.py) and the
job's progress sink on a 4,000-token answer cut into 1-token chunks, as OpenAI
streams it: CPU per chunk by tenth of the answer (flat if the parse is linear),
and CPU per character for answers of 1,000 to 16,000 tokens.

`run`: a PostgreSQL cluster of its own (tests/pgserver.Cluster: its WAL and its
statistics are this run's alone, track_functions = pl), the fake providers as
their own process at a realistic pace (time to first token 0.5 s, 75 tokens/s,
answers of 1,500-4,000 tokens), and the real `ai-jobs worker` (OpenAI through
the real SDK) with WORKER_CONCURRENCY = --jobs. `--rounds` batches of `--jobs`
courses are inserted at once; the run reports, per job, the time from the insert
to the first group in partial_result and to done (the rows polled every 0.1 s, or
0.5 s at more than 50 jobs), the commits and WAL bytes (pg_current_wal_lsn
deltas; the polls' own commits subtracted), the progress statements
(pg_stat_user_functions: calls of progress_jobs / 2), and the worker process's
CPU (/proc/<pid>/stat) against the tokens it received. `--no-progress` runs the
same worker with its progress writes cut out (ProgressBoard.flush a no-op): the
baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.proc import cpu_seconds, rss_mb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACE = ["--ttft", "0.5", "--tps", "75", "--size", "1500-4000"]


# -- parse ------------------------------------------------------------------------


def answer(tokens: int) -> str:
    from tests.fakeai.answers import course_from_prompt, sized

    course = course_from_prompt("Write a course on Parsing\nGroups: 3\nItems per group: 12\n")
    return json.dumps(sized(course, tokens))


def parse_bench() -> dict[str, Any]:
    from listener.course_schema import CourseParams
    from listener.course_stream import CourseStream
    from listener.jobs import Job
    from listener.progress import JobProgress

    params = CourseParams()
    out: dict[str, Any] = {}

    def chunks(text: str) -> list[str]:
        return [text[i : i + 4] for i in range(0, len(text), 4)]  # ~1 token each

    text = answer(4000)
    pieces = chunks(text)
    for what in ("reader", "sink"):
        best: list[float] | None = None
        for _ in range(5):  # the best of five: the least disturbed by the machine
            per: list[int] = []
            if what == "reader":
                feed = CourseStream(params).feed
            else:
                job = Job("ai_course_jobs", *(_uuid(), _uuid()), 0, 3, {})
                feed = JobProgress(job).course_reader(params, "parsing", "Parsing")()
            for piece in pieces:
                t0 = time.process_time_ns()
                feed(piece)
                per.append(time.process_time_ns() - t0)
            tenth = len(per) // 10
            means = [statistics.fmean(per[i * tenth : (i + 1) * tenth]) / 1000 for i in range(10)]
            if best is None or sum(means) < sum(best):
                best = means
        assert best is not None
        out[f"{what}_us_per_chunk_by_tenth"] = [round(m, 2) for m in best]
    out["chunks"] = len(pieces)
    out["chars"] = len(text)
    per_char = {}
    for size in (1000, 2000, 4000, 8000, 16000):
        t = answer(size)
        ps = chunks(t)
        runs = []
        for _ in range(5):
            s = CourseStream(params)
            t0 = time.process_time_ns()
            for p in ps:
                s.feed(p)
            runs.append((time.process_time_ns() - t0) / len(t))
        per_char[size] = round(min(runs), 1)
    out["reader_ns_per_char_by_answer_tokens"] = per_char
    return out


def _uuid() -> Any:
    import uuid

    return uuid.uuid4()


# -- sdk --------------------------------------------------------------------------


def sdk_bench(tokens_per_event: int) -> dict[str, Any]:
    """The worker's whole cost of a streamed answer but the network's: the real SDK
    (its HTTP client on an in-memory transport that hands over one event per
    read), the provider's loop with its stall clocks, and the job's progress
    sink, for a 4,000-token answer at `tokens_per_event` tokens an event. CPU per
    event and per token, and what 500 streams at 75 tokens/s would need."""
    import anthropic
    import openai

    try:  # the HTTP client the SDKs use (newer versions: httpx2)
        httpx: Any = importlib.import_module("httpx2")
    except ImportError:
        httpx = importlib.import_module("httpx")

    from listener.course_schema import CourseParams
    from listener.jobs import Job
    from listener.progress import JobProgress
    from listener.prompts import course_prompt
    from listener.providers.anthropic import AnthropicProvider
    from listener.providers.openai import OpenAIProvider
    from listener.settings import Settings
    from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY
    from tests.fakeai.answers import AnthropicStream, OpenAIStream

    text = answer(4000)
    step = 4 * tokens_per_event
    out: dict[str, Any] = {"tokens_per_event": tokens_per_event, "answer_chars": len(text)}

    def events(name: str) -> list[bytes]:
        s: Any
        if name == "openai":
            s = OpenAIStream("gpt-4.1-mini", True, False)
        else:
            s = AnthropicStream("claude-haiku-4-5", "save_course", {"input_tokens": 150})
        evs = [s.opening()] if s.opening() else []
        for i in range(0, len(text), step):
            evs.append((b"" if i else s.first()) + s.delta(text[i : i + step]))
        usage = {"prompt_tokens": 120, "completion_tokens": 4000, "total_tokens": 4120}
        evs.append(s.closing("stop", usage) if name == "openai" else s.closing("tool_use", 4000))
        return evs

    async def one(name: str) -> tuple[float, int]:
        evs = events(name)

        class Body(httpx.AsyncByteStream):  # type: ignore[misc]
            async def __aiter__(self):  # type: ignore[no-untyped-def]
                for e in evs:
                    yield e

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())

        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, openai_api_key=FAKE_OPENAI_KEY, anthropic_api_key=FAKE_ANTHROPIC_KEY
        )
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        p: Any
        if name == "openai":
            p = OpenAIProvider(settings)
            p.client = openai.AsyncOpenAI(api_key="x", http_client=http, max_retries=0)
        else:
            p = AnthropicProvider(settings)
            p._client = anthropic.AsyncAnthropic(api_key="x", http_client=http, max_retries=0)
        params = CourseParams()
        prompt = course_prompt("Parsing", "parsing", params)
        job = Job("ai_course_jobs", _uuid(), _uuid(), 0, 3, {})
        sink = JobProgress(job).course_reader(params, "parsing", "Parsing")()
        t0 = time.process_time()
        got = await p.course(prompt, sink)
        spent = time.process_time() - t0
        await http.aclose()
        assert got.text == text, "the answer came back whole"
        return spent, len(evs)

    for name in ("openai", "anthropic"):
        runs = [asyncio.run(one(name)) for _ in range(5)]
        spent, n = min(runs)
        per_event = spent / n
        per_token = spent / 4000
        out[name] = {
            "events": n,
            "cpu_ms_per_answer": round(spent * 1000, 1),
            "cpu_us_per_event": round(per_event * 1e6, 1),
            "cpu_us_per_token": round(per_token * 1e6, 2),
            "cores_for_500_streams_at_75_tps": round(500 * 75 * per_token, 2),
        }
    return out


# -- flush ------------------------------------------------------------------------


def flush_bench(url: str, jobs: int, budget: int | None) -> dict[str, Any]:
    """One progress write for `jobs` running courses (a database of its own on the
    server at `url`): with only their progress changed, then with a group finished
    in each of them at once (jobs that started together), three times; with
    `budget`, PARTIAL_BYTES_PER_WRITE set to it (0: no limit)."""
    import contextvars
    import uuid

    import psycopg

    from listener import dal, db, progress
    from listener.course_schema import CourseParams
    from listener.jobs import Job
    from listener.migrate import migrate
    from tests.pgserver import with_dbname

    if budget is not None:
        progress.PARTIAL_BYTES_PER_WRITE = budget or 1 << 62
    name = f"bench_flush_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    dsn = with_dbname(url, name)
    try:
        asyncio.run(migrate(dsn))

        async def go() -> dict[str, Any]:
            pool = db.make_pool(dsn, 5)
            await pool.open()
            try:
                async with pool.connection() as c:
                    await c.execute(
                        "insert into ai_course_jobs (subject) select 'flush ' || g"
                        " from generate_series(1, %s) g",
                        [jobs],
                    )
                params = {"table": "ai_course_jobs", "worker": "bench", "n": jobs}
                claimed = [Job.from_claim(r) for r in await dal.CLAIM_JOBS.all(pool, params)]
                board = progress.ProgressBoard(
                    lambda p: dal.PROGRESS_JOBS.all(pool, p), 1.0, lambda e, w: None
                )
                sinks = []
                for j in claimed:
                    contextvars.copy_context().run(board.open, j)
                    reader = board.jobs[j.id].course_reader(CourseParams(), "flush", "Flush")
                    sinks.append(reader())
                text = answer(2750)
                ends = [text.index('"id": "g2"'), text.index('"id": "g3"'), len(text)]
                out: dict[str, Any] = {"jobs": jobs, "tokens_only_ms": [], "a_group_each": []}
                pos = 0
                for end in ends:
                    for s in sinks:
                        s(text[pos : pos + 40])
                    pos += 40
                    t0 = time.perf_counter()
                    await board.flush()
                    out["tokens_only_ms"].append(round((time.perf_counter() - t0) * 1000, 1))
                    for s in sinks:
                        s(text[pos:end])
                    pos = end
                    writes = []
                    while any(jp.partial_dirty for jp in board.jobs.values()):
                        t0 = time.perf_counter()
                        await board.flush()
                        writes.append(round((time.perf_counter() - t0) * 1000, 1))
                    out["a_group_each"].append(writes)
                return out
            finally:
                await pool.close()

        result = asyncio.run(go())
        result["budget_bytes"] = progress.PARTIAL_BYTES_PER_WRITE
        return result
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


# -- run --------------------------------------------------------------------------


def start_worker(
    url: str, base: str, jobs: int, progress: bool, flush_log: Path, **extra: str
) -> Any:
    """The real `ai-jobs worker` (through `_worker`: its progress writes timed into
    `flush_log`, or cut out) on OpenAI at `base`, WORKER_CONCURRENCY = jobs."""
    from tests.fakeai import FAKE_OPENAI_KEY

    env = {
        **os.environ,
        "DATABASE_URL": url,
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": f"{base}/v1",
        "AI_PROVIDER_PRIORITY": "openai",
        "ALLOW_PLACEHOLDER": "0",
        "WORKER_CONCURRENCY": str(jobs),
        "AI_TIMEOUT_SECONDS": "300",
        "AI_MAX_OUTPUT_TOKENS": "4500",
        "PROVIDER_LIMITS": "openai=rpm:10000,tpm:10000000",
        "CACHE_TTL_SECONDS": "0",
        "PROGRESS_INTERVAL_SECONDS": "1",
        "SWEEP_INTERVAL_SECONDS": "3600",
        "STORAGE_URL": tempfile.mkdtemp(prefix="ai-jobs-bench-storage-"),
        "LOG_LEVEL": "WARNING",
        "BENCH_FLUSH_LOG": str(flush_log),
        **extra,
    }
    for key in ("ANTHROPIC_API_KEY", "SENTRY_DSN"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "bench.streaming", "_worker"]
    if not progress:
        cmd.append("--no-progress")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)


def run_bench(jobs: int, rounds: int, progress: bool) -> dict[str, Any]:
    import psycopg
    from psycopg.rows import dict_row

    from listener.migrate import migrate
    from tests.pgserver import Cluster

    cluster = Cluster()
    fake = worker = None
    try:
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write(
                "track_functions = 'pl'\nmax_connections = 300\n"
                # every statement logged with its client's name: counted below
                "log_statement = 'all'\nlog_line_prefix = '@%a@ '\n"
            )
        cluster.start()
        cluster.wait_ready()
        asyncio.run(migrate(cluster.url))
        fake = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeai", *PACE],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert fake.stdout is not None
        base = fake.stdout.readline().strip()
        flush_log = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-")) / "flushes.json"
        worker = start_worker(cluster.url, base, jobs, progress, flush_log)
        conn = psycopg.connect(
            cluster.url, autocommit=True, row_factory=dict_row, application_name="bench"
        )
        polls = 0

        def q(sql: str, *args: Any) -> list[dict[str, Any]]:
            nonlocal polls
            polls += 1
            return conn.execute(sql, list(args)).fetchall()

        deadline = time.monotonic() + 60
        while not q("select 1 from ai_job_workers"):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not start")
            time.sleep(0.2)
        time.sleep(12)  # the worker's start-up statistics flushed (idle backends: <= 10 s)
        conn.execute("checkpoint")
        time.sleep(1)
        polls = 0
        log = cluster.dir / "log"
        log_from = log.stat().st_size
        before = q(
            "select pg_current_wal_lsn() as lsn, xact_commit + xact_rollback as xacts"
            " from pg_stat_database where datname = current_database()"
        )[0]
        cpu0, wall0 = cpu_seconds(worker.pid), time.monotonic()
        every = 0.1 if jobs <= 50 else 0.5
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        for r in range(rounds):
            rows = q(
                "insert into ai_course_jobs (subject) select 'Streaming rivers ' || %s || '-' || g"
                " from generate_series(1, %s) g returning id",
                r,
                jobs,
            )
            t0 = time.monotonic()
            ids = [str(x["id"]) for x in rows]
            while len([i for i in ids if i in done]) < len(ids):
                if time.monotonic() - t0 > 600 or worker.poll() is not None:
                    raise RuntimeError("jobs did not finish")
                time.sleep(every)
                now = time.monotonic() - t0
                for row in q(
                    "select id::text, status, partial_result is not null as shown"
                    " from ai_course_jobs where id = any(%s::uuid[])",
                    ids,
                ):
                    if row["shown"] and row["id"] not in first:
                        first[row["id"]] = now
                    if row["status"] == "done" and row["id"] not in done:
                        done[row["id"]] = now
                    if row["status"] in ("failed", "dead_letter"):
                        raise RuntimeError(f"job {row['id']} {row['status']}")
        cpu1, wall1 = cpu_seconds(worker.pid), time.monotonic()
        tokens = q(
            "select sum((metrics->>'outputTokens')::bigint) as n, count(*) as jobs"
            " from ai_course_jobs where status = 'done'"
        )[0]
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        time.sleep(1.5)
        polls_total = polls
        after = conn.execute(
            "select pg_current_wal_lsn() as lsn, xact_commit + xact_rollback as xacts,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint as wal"
            " from pg_stat_database where datname = current_database()",
            [before["lsn"]],
        ).fetchone()
        assert after is not None
        calls = conn.execute(
            "select coalesce(sum(calls), 0)::bigint as n from pg_stat_user_functions"
            " where funcname = 'progress_jobs'"
        ).fetchone()
        conn.close()
        statements = progress_lines = 0
        with open(log, "rb") as f:
            f.seek(log_from)
            mine = False  # the lines of a statement of the worker's (it spans lines)
            for raw in f:
                line = raw.decode(errors="replace")
                if line.startswith("@"):  # a new log entry
                    mine = not line.startswith("@bench@") and (
                        "LOG:  statement: " in line or "LOG:  execute " in line
                    )
                    statements += mine
                progress_lines += mine and "progress_jobs('ai_course_jobs'" in line
        n = jobs * rounds
        flushes = json.loads(flush_log.read_text()) if flush_log.exists() else []
        missing = [i for i in done if i not in first]
        lead = [done[i] - first[i] for i in first]
        return {
            "jobs_in_flight": jobs,
            "rounds": rounds,
            "progress": progress,
            "pace": " ".join(PACE),
            "first_group_s": _dist([first[i] for i in first]),
            "done_s": _dist(list(done.values())),
            "first_group_before_done_s": _dist(lead),
            "jobs_without_a_group_seen": len(missing),
            "commits_per_job": round((after["xacts"] - before["xacts"] - polls_total) / n, 1),
            "worker_statements_per_job": round(statements / n, 1),
            "progress_statements_logged": progress_lines,
            "wal_bytes_per_job": round(after["wal"] / n),
            "progress_statements": int(calls["n"] if calls else 0) // 2,
            "progress_write_s": _dist([f[0] for f in flushes]),
            "progress_jobs_per_write": _dist([f[1] for f in flushes]),
            "worker_cpu_s": round(cpu1 - cpu0, 2),
            "wall_s": round(wall1 - wall0, 1),
            "worker_cores": round((cpu1 - cpu0) / (wall1 - wall0), 3),
            "output_tokens": int(tokens["n"] or 0),
            "tokens_per_s_received": round(int(tokens["n"] or 0) / (wall1 - wall0), 1),
            "loadavg_at_end": os.getloadavg(),
        }
    finally:
        _stop(worker, fake, cluster)


# -- steady -----------------------------------------------------------------------


def steady_bench(
    jobs: int, seconds: float, chunk: int, progress: bool, httpx: bool = False
) -> dict[str, Any]:
    """`jobs` streams at once, all the time: the real worker at WORKER_CONCURRENCY =
    jobs with a backlog that keeps every slot busy, against bench/pacedai.py (0.5 s
    to the first token, 75 tokens/s, `chunk` tokens an event, answers of
    1,500-4,000 tokens). Once the streams are all open, for `seconds`: the
    worker's CPU, the tokens the fake sent, the streams open (sampled each
    second), the progress writes (their cadence), the worker's RSS."""
    import urllib.request

    import psycopg

    from listener.migrate import migrate
    from tests.pgserver import Cluster

    cluster = Cluster()
    fake = worker = None

    def stats() -> dict[str, Any]:
        with urllib.request.urlopen(f"{base}/_stats", timeout=10) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out

    try:
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write("track_functions = 'pl'\nmax_connections = 300\n")
        cluster.start()
        cluster.wait_ready()
        asyncio.run(migrate(cluster.url))
        fake = subprocess.Popen(
            [sys.executable, "-m", "bench.pacedai", *PACE, "--chunk", str(chunk)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert fake.stdout is not None
        base = fake.stdout.readline().strip()
        flush_log = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-")) / "flushes.json"
        extra = {"SHUTDOWN_GRACE_SECONDS": "1"} | ({"BENCH_HTTPX": "1"} if httpx else {})
        worker = start_worker(cluster.url, base, jobs, progress, flush_log, **extra)
        conn = psycopg.connect(cluster.url, autocommit=True, application_name="bench")
        # enough work for every slot past the window: a course takes 38 s on average
        backlog = jobs * (2 + int((seconds + 60) / 30))
        conn.execute(
            "insert into ai_course_jobs (subject) select 'Steady streams ' || g"
            " from generate_series(1, %s) g",
            [backlog],
        )
        deadline = time.monotonic() + 180
        while stats()["open"] < jobs * 0.98:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the streams did not all open")
            time.sleep(0.5)
        time.sleep(5)
        s0, cpu0, t0 = stats(), cpu_seconds(worker.pid), time.monotonic()
        fcpu0 = cpu_seconds(fake.pid)
        w0 = time.time()
        open_samples = []
        while time.monotonic() - t0 < seconds:
            time.sleep(1)
            open_samples.append(stats()["open"])
        s1, cpu1, t1 = stats(), cpu_seconds(worker.pid), time.monotonic()
        fcpu1 = cpu_seconds(fake.pid)
        w1 = time.time()
        rss = rss_mb(worker.pid)
        done = conn.execute("select count(*) from ai_course_jobs where status = 'done'").fetchone()
        bad = conn.execute(
            "select count(*), array_agg(distinct error) from ai_course_jobs"
            " where status in ('failed', 'dead_letter') or retry_count > 0"
        ).fetchone()
        conn.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(120)
        flushes = json.loads(flush_log.read_text()) if flush_log.exists() else []
        window = [f for f in flushes if w0 <= f[2] <= w1]
        ends = sorted(f[2] for f in window)
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        wall = t1 - t0
        tokens = s1["tokens"] - s0["tokens"]
        return {
            "streams": jobs,
            "chunk_tokens": chunk,
            "progress": progress,
            "transport": "httpx (the SDK's default)" if httpx else "aiohttp",
            "pace": " ".join(PACE),
            "window_s": round(wall, 1),
            "streams_open": _dist([float(x) for x in open_samples]),
            "tokens_per_s_sent": round(tokens / wall),
            "tokens_per_s_asked": round(statistics.median(open_samples) * 75),
            "events_per_s": round(tokens / chunk / wall),
            "worker_cpu_s": round(cpu1 - cpu0, 2),
            "worker_cores": round((cpu1 - cpu0) / wall, 3),
            "worker_cpu_us_per_token": round((cpu1 - cpu0) / max(tokens, 1) * 1e6, 2),
            "fake_cores": round((fcpu1 - fcpu0) / wall, 3),
            "worker_rss_mb": round(rss, 1),
            "streams_completed_in_window": s1["completed"] - s0["completed"],
            "jobs_done_by_end": int(done[0]) if done else 0,
            "jobs_failed_or_retried": int(bad[0]) if bad else 0,
            "errors": bad[1] if bad else None,
            "progress_writes_in_window": len(ends),
            "progress_write_gap_s": _dist(gaps),
            "progress_write_s": _dist([f[0] for f in window]),
            "progress_jobs_per_write": _dist([f[1] for f in window]),
            "loadavg_at_end": os.getloadavg(),
        }
    finally:
        _stop(worker, fake, cluster)


def _stop(worker: Any, fake: Any, cluster: Any) -> None:
    """The run's processes stopped (SIGTERM, then SIGKILL after 30 s), its cluster removed."""
    for p in (worker, fake):
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if fake is not None and fake.stdout is not None:
        fake.stdout.close()
    cluster.destroy()


def _dist(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "median": round(statistics.median(v), 2),
        "p90": round(pick(0.9), 2),
        "min": round(v[0], 2),
        "max": round(v[-1], 2),
    }


def worker_main(no_progress: bool) -> int:
    from listener import cli, progress

    if os.environ.get("BENCH_HTTPX"):  # the SDK's default transport, for comparison
        from listener.providers import openai as openai_provider

        openai_provider.sdk_transport = lambda sdk: {}  # type: ignore[attr-defined]

    flushes: list[tuple[float, int, float]] = []  # (seconds, jobs written, end) of each write
    if out := os.environ.get("BENCH_FLUSH_LOG"):
        import atexit

        timed = progress.ProgressBoard.flush

        async def flush_timed(self: progress.ProgressBoard) -> int:
            t0 = time.perf_counter()
            n = await timed(self)
            if n:
                flushes.append((time.perf_counter() - t0, n, time.time()))
            return n

        progress.ProgressBoard.flush = flush_timed  # type: ignore[method-assign]
        atexit.register(lambda: Path(out).write_text(json.dumps(flushes)))
    if no_progress:

        async def flush(self: progress.ProgressBoard) -> int:
            for jp in self.jobs.values():
                jp.dirty = jp.partial_dirty = False
            return 0

        progress.ProgressBoard.flush = flush  # type: ignore[method-assign]
    return cli.main(["worker"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("parse")
    f = sub.add_parser("flush")
    f.add_argument("--url", default=os.environ.get("TEST_DATABASE_URL"), help="a server")
    f.add_argument("--jobs", type=int, default=500)
    f.add_argument("--budget", type=int, default=None, help="bytes (0: no limit)")
    k = sub.add_parser("sdk")
    k.add_argument("--tokens-per-event", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--jobs", type=int, default=1, help="jobs in flight (WORKER_CONCURRENCY)")
    r.add_argument("--rounds", type=int, default=1, help="batches of --jobs, one after another")
    r.add_argument("--no-progress", action="store_true", help="the worker writes no progress")
    d = sub.add_parser("steady")
    d.add_argument("--jobs", type=int, default=500, help="streams at once (WORKER_CONCURRENCY)")
    d.add_argument("--seconds", type=float, default=60, help="the measured window")
    d.add_argument("--chunk", type=int, default=1, help="tokens per streamed event")
    d.add_argument("--no-progress", action="store_true", help="the worker writes no progress")
    d.add_argument("--httpx", action="store_true", help="the SDK's default transport (httpx)")
    w = sub.add_parser("_worker")
    w.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.what == "_worker":
        return worker_main(a.no_progress)
    if a.what == "parse":
        result = parse_bench()
        name = "streaming-parse.json"
    elif a.what == "flush":
        result = flush_bench(a.url, a.jobs, a.budget)
        name = f"streaming-flush-{a.jobs}-{'default' if a.budget is None else a.budget}.json"
    elif a.what == "sdk":
        result = sdk_bench(a.tokens_per_event)
        name = f"streaming-sdk-{a.tokens_per_event}.json"
    elif a.what == "steady":
        result = steady_bench(a.jobs, a.seconds, a.chunk, not a.no_progress, a.httpx)
        name = (
            f"streaming-steady-{a.jobs}-{a.chunk}-{'off' if a.no_progress else 'on'}"
            f"{'-httpx' if a.httpx else ''}.json"
        )
    else:
        result = run_bench(a.jobs, a.rounds, not a.no_progress)
        name = f"streaming-run-{a.jobs}-{'off' if a.no_progress else 'on'}.json"
    result["command"] = "python -m bench.streaming " + " ".join(argv or sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
