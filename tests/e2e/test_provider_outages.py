"""Provider outages through the real `ai-jobs worker` and the real SDKs, against
the fake provider server: a hanging provider, a 429 storm, a bad key, a refusal,
and two workers sharing one breaker."""

from __future__ import annotations

import signal
import statistics
import subprocess
from typing import Any

import pytest

from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.helpers import AI_JOBS, connect, env, insert_course, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)


def providers_env(fake: FakeAI, **extra: Any) -> dict[str, Any]:
    return {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "CACHE_TTL_SECONDS": "0",
        **extra,
    }


def insert_many(db_url: str, n: int, table: str = "ai_course_jobs") -> None:
    with connect(db_url) as c:
        if table == "ai_course_jobs":
            c.execute(
                "insert into ai_course_jobs (subject, params)"
                " select 'Subject ' || g, '{\"itemsPerGroup\": 2, \"groupCount\": 1}'"
                " from generate_series(1, %s) g",
                [n],
            )
        else:
            c.execute(
                "insert into ai_media_jobs (prompt, media_type)"
                " select 'picture ' || g, 'image' from generate_series(1, %s) g",
                [n],
            )


def rows(db_url: str, table: str = "ai_course_jobs") -> list[dict[str, Any]]:
    with connect(db_url) as c:
        return list(c.execute(f"select * from {table}").fetchall())


def all_done(db_url: str, table: str = "ai_course_jobs") -> bool:
    return all(r["status"] == "done" for r in rows(db_url, table))


def stop(w: WorkerProcess) -> None:
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def test_a_hanging_provider_costs_a_handful_of_calls(db_url: str, fake: FakeAI) -> None:
    fake.modes["openai"] = "hang"
    w = WorkerProcess(
        db_url,
        **providers_env(
            fake,
            AI_PROVIDER_PRIORITY="openai",
            ALLOW_PLACEHOLDER="1",
            AI_TIMEOUT_SECONDS="2",
            WORKER_CONCURRENCY="3",
            PROVIDER_BREAKER_COOLDOWN_SECONDS="600",
        ),
    ).started()
    try:
        insert_many(db_url, 30)
        wait_until(lambda: all_done(db_url), timeout=60, what="30 jobs done")
    finally:
        stop(w)
    done = rows(db_url)
    # The first jobs found out (concurrency 3, threshold 3); the others passed it by.
    assert fake.count("openai") <= 5
    skipped = [
        r
        for r in done
        if r["metrics"]["fallbacks"][:1] != ["openai: stream stalled: no answer within 2s"]
    ]
    assert len(skipped) >= 25
    assert all(r["metrics"]["provider"] == "placeholder" for r in done)
    assert all(r["metrics"]["fallbacks"][0].startswith("openai: breaker open") for r in skipped)
    assert statistics.median(r["metrics"]["totalDurationMs"] for r in done) < 2000
    assert len(w.actions("provider_breaker_open")) == 1


def test_a_429_storm_delays_jobs_and_kills_none(db_url: str, fake: FakeAI) -> None:
    fake.modes["openai"] = "429"
    fake.retry_headers = {"retry-after-ms": "1000"}
    w = WorkerProcess(
        db_url,
        **providers_env(
            fake, AI_PROVIDER_PRIORITY="openai", ALLOW_PLACEHOLDER="0", RETRY_BASE_SECONDS="0.2"
        ),
    ).started()
    try:
        insert_many(db_url, 10, "ai_media_jobs")
        # The storm lasts a few of the provider's own "come back in 1 s".
        wait_until(lambda: fake.answered("openai", "429") >= 5, timeout=30, what="429s")
        during = rows(db_url, "ai_media_jobs")
        w.wait_for("claims_held")
        fake.modes["openai"] = "valid"
        wait_until(lambda: all_done(db_url, "ai_media_jobs"), timeout=30, what="10 images done")
    finally:
        stop(w)
    assert not [r for r in during if r["status"] in ("dead_letter", "failed")]
    waiting = [r for r in during if r["status"] == "pending" and r["error"]]
    assert waiting and waiting[0]["error"].startswith("Providers unavailable: openai: ")
    after = rows(db_url, "ai_media_jobs")
    assert all(r["retry_count"] <= 1 for r in after) and len(after) == 10
    # A probe a second while it lasted, not every job on every claim.
    assert fake.answered("openai", "429") <= 15


def test_an_auth_error_alerts_once(db_url: str, fake: FakeAI) -> None:
    fake.modes["openai"] = "401"
    w = WorkerProcess(
        db_url,
        **providers_env(
            fake,
            AI_PROVIDER_PRIORITY="openai",
            ALLOW_PLACEHOLDER="1",
            ALERT_INTERVAL_SECONDS="0.2",
            ALERT_WEBHOOK_URL=f"{fake.url}/hook/T000/secret",
        ),
    ).started()
    try:
        insert_many(db_url, 20)
        wait_until(lambda: all_done(db_url), timeout=30, what="20 jobs done")
        wait_until(lambda: _auth_hooks(fake), timeout=10, what="the provider_auth webhook")
        first_samples = _samples(db_url)
        wait_until(lambda: _samples(db_url) >= first_samples + 10, what="more alert ticks")
        insert_many(db_url, 5)  # more jobs while it fires: no more calls, no more alerts
        wait_until(lambda: all_done(db_url), timeout=30, what="5 more jobs done")
    finally:
        stop(w)
    assert fake.count("openai") <= 3  # the jobs running at once when it was found
    assert len(_auth_hooks(fake)) == 1
    firing = [e for e in w.actions("alert_firing") if e.get("rule") == "provider_auth"]
    assert len(firing) == 1 and len(w.actions("provider_auth")) == 1
    assert FAKE_OPENAI_KEY not in w.log()


def _auth_hooks(fake: FakeAI) -> list[Any]:
    return [h for h in fake.hooks if "provider_auth" in str(h)]


def _samples(db_url: str) -> int:
    with connect(db_url) as c:
        return int(c.execute("select count(*) from ai_job_counter_samples").fetchone()["count"])


def test_a_refusal_dead_letters_at_once_with_the_reason(db_url: str, fake: FakeAI) -> None:
    fake.modes.update(openai="refusal", anthropic="refusal")
    w = WorkerProcess(db_url, **providers_env(fake, ALLOW_PLACEHOLDER="0")).started()
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "Something Forbidden", max_retries=3)
            wait_until(lambda: job(c, jid)["status"] == "dead_letter", what="dead letter")
            row = job(c, jid)
    finally:
        stop(w)
    assert row["retry_count"] == 1
    assert row["error"] == (
        "Request refused by every provider: "
        "openai: refused: I'm sorry, I can't help with that request.; "
        "anthropic: refused: the model declined (stop_reason refusal)"
    )
    assert fake.count("openai") == 1 and fake.count("anthropic") == 1


def test_two_workers_share_one_breaker(db_url: str, fake: FakeAI) -> None:
    fake.modes["openai"] = "hang"
    settings = providers_env(
        fake,
        AI_PROVIDER_PRIORITY="openai",
        ALLOW_PLACEHOLDER="1",
        AI_TIMEOUT_SECONDS="1",
        WORKER_CONCURRENCY="2",
        PROVIDER_BREAKER_THRESHOLD="2",
        PROVIDER_BREAKER_COOLDOWN_SECONDS="600",
    )
    first = WorkerProcess(db_url, **settings).started()
    second: WorkerProcess | None = None
    try:
        insert_many(db_url, 2)
        first.wait_for("provider_breaker_open", timeout=30)
        wait_until(lambda: all_done(db_url), what="the first jobs done")
        calls = fake.count("openai")
        second = WorkerProcess(db_url, **settings).started()
        stop(first)  # the second worker does the rest, with what the first found out
        insert_many(db_url, 10)
        wait_until(lambda: len(rows(db_url)) == 12 and all_done(db_url), what="12 jobs done")
    finally:
        if first.proc.poll() is None:
            stop(first)
        if second is not None:
            stop(second)
    assert calls == 2 and fake.count("openai") == calls
    assert second is not None and not second.actions("provider_breaker_open")
    later = [r for r in rows(db_url) if r["metrics"]["fallbacks"][0].startswith("openai: breaker")]
    assert len(later) == 10


def test_no_provider_no_worker(db_url: str) -> None:
    p = subprocess.run(
        [*AI_JOBS, "worker"],
        env=env(db_url, ALLOW_PLACEHOLDER="0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "ai-jobs: error: No AI provider configured: set OPENAI_API_KEY or ANTHROPIC_API_KEY "
        "(or ALLOW_PLACEHOLDER=1); the worker does not start without one"
    ]
