"""The console's reads against 1,000,000 finished jobs: each one is an index walk
that stops at its page or counts only live rows, never a scan of the history.

Asserted on the work PostgreSQL reports for the transaction (rows read by
sequential scans, heap rows fetched by index scans on the job table), not on
time: speeds are measured by `make bench` (its console cost part)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from listener import dal
from tests.helpers import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROWS = 1_000_000


@pytest.fixture(scope="module")
def big_db(pg_server: str, template_db: str) -> Iterator[str]:
    """One database for the module: a million finished course jobs over 23 days,
    one in a hundred a dead letter, one in fifty with a user, two providers;
    filled by one insert with triggers off, then counted afresh."""
    from tests.conftest import _admin, _drop_database, _new_database
    from tests.pgserver import with_dbname

    name = _new_database(pg_server, template_db)
    url = with_dbname(pg_server, name)
    with connect(url) as c:
        try:
            c.execute("set session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("filling a million rows without triggers needs a superuser")
        c.execute(
            "insert into ai_course_jobs (subject, status, created_at, started_at, completed_at,"
            " result_path, metrics, created_by)"
            " select 'old course ' || g,"
            "  case when g %% 100 = 0 then 'dead_letter' else 'done' end,"
            "  now() - interval '30 days' + g * interval '2 s',"
            "  now() - interval '30 days' + g * interval '2 s' + interval '1 s',"
            "  now() - interval '30 days' + g * interval '2 s' + interval '20 s',"
            "  'courses/old/course.json',"
            "  jsonb_build_object('provider',"
            "                     case when g %% 3 = 0 then 'anthropic' else 'openai' end),"
            "  case when g %% 50 = 0 then md5((g %% 1000)::text)::uuid end"
            " from generate_series(1, %s) g",
            [ROWS],
        )
        c.execute("set session_replication_role = default")
        c.execute("select ai_job_recount()")
        c.execute("vacuum analyze ai_course_jobs")
        # Today's work, the same at any history size.
        c.execute(
            "insert into ai_course_jobs (subject, status, created_by)"
            " select 'live ' || g, case when g % 2 = 0 then 'pending' else 'failed' end,"
            " null from generate_series(1, 40) g"
        )
    yield url
    with _admin(pg_server) as conn:
        _drop_database(conn, name)


def _work(c: psycopg.Connection[Any], query: str, params: Any = None) -> dict[str, int]:
    """Run one read in its own transaction; what it read from ai_course_jobs."""
    # The "xact" counters read the backend's pending statistics, which keep what
    # earlier transactions read until they are flushed (at most once a second,
    # when the backend is idle): flush them first, or an earlier query's rows
    # (the test's own set-up reads 20,000 of them) count as this read's.
    c.execute("select pg_stat_force_next_flush()")
    c.commit()
    with c.transaction():
        rows = c.execute(query, params).fetchall()
        stats = c.execute(
            "select pg_stat_get_xact_numscans(t) as scans,"
            " pg_stat_get_xact_tuples_returned(t) as seq_rows,"
            " pg_stat_get_xact_tuples_fetched(t) as fetched"
            " from (select 'ai_course_jobs'::regclass::oid as t) x"
        ).fetchone()
    assert stats is not None
    return {"rows": len(rows), "seq_rows": stats["seq_rows"], "fetched": stats["fetched"]}


FIND = (
    "select * from find_jobs(table_name => %(t)s, status => %(s)s, provider => %(p)s,"
    " user_id => %(u)s, created_after => %(after)s, search => %(q)s,"
    " cursor_created_at => %(cc)s, cursor_id => %(ci)s, page_size => 51)"
)


def _find(**kw: Any) -> dict[str, Any]:
    keys = ("t", "s", "p", "u", "after", "q", "cc", "ci")
    return {k: kw.get(k) for k in keys}


def test_find_jobs_reads_a_page_not_the_history(big_db: str) -> None:
    with connect(big_db) as c:
        c.autocommit = False
        some = c.execute(
            "select id, created_at, created_by from ai_course_jobs"
            " where created_by is not null order by created_at limit 1 offset 5000"
        ).fetchone()
        c.rollback()
        assert some is not None
        deep = c.execute(
            "select created_at, id from ai_course_jobs order by created_at desc, id desc"
            " offset 700000 limit 1"
        ).fetchone()
        c.rollback()
        assert deep is not None
        cases = {
            "newest": _find(),
            "a page deep in the history": _find(cc=deep["created_at"], ci=deep["id"]),
            "dead letters": _find(s="dead_letter"),
            "done": _find(s="done"),
            "failed (live)": _find(s="failed"),
            "provider": _find(p="anthropic"),
            "a provider nobody used": _find(p="placeholder"),
            "user": _find(u=some["created_by"]),
            "id": _find(q=str(some["id"])),
            "start of an id": _find(q=str(some["id"])[:8]),
            "created in the last hour": _find(after="now() - interval '1 hour'"),
            "course table only": _find(t="ai_course_jobs"),
        }
        for name, params in cases.items():
            if name == "created in the last hour":
                query = FIND.replace("%(after)s", "now() - interval '1 hour'")
            else:
                query = FIND
            work = _work(c, query, params)
            assert work["seq_rows"] == 0, (name, work)
            assert work["fetched"] <= 200, (name, work)  # a page, not a million rows
            assert work["rows"] >= 1 or name == "a provider nobody used", (name, work)


def test_console_reads_stay_off_the_history(big_db: str) -> None:
    """The cards, /metrics, `status` and the alert rules."""
    params = {
        "limit": 50,
        "stale_seconds": 300,
        "seconds": 300,
        "providers": ["openai", "anthropic", "placeholder"],
    }
    with connect(big_db) as c:
        c.autocommit = False
        for name in (
            "queue_depth",
            "job_metrics",
            "recent_jobs",
            "alert_values",
            "duration_quantiles",
            "failures_last_hour",
            "provider_latency",
            "stuck_jobs",
            "live_depth",
        ):
            work = _work(c, dal.sql(name), params)
            assert work["seq_rows"] == 0, (name, work)
            assert work["fetched"] <= 200, (name, work)
        counts = {
            r["status"]: r["jobs"]
            for r in c.execute("select * from ai_job_status_counts()").fetchall()
        }
        assert counts == {"done": 990_000, "dead_letter": 10_000, "pending": 20, "failed": 20}
