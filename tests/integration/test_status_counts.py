"""The counts per status that the console reads (sql/017): always what the
runbook's ai_job_metrics view says, whoever changed the jobs and however."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.helpers import connect, insert_course, insert_media


def _view(c: psycopg.Connection[Any]) -> dict[tuple[str, str], tuple[int, float | None]]:
    rows = c.execute(
        "select job_type, status, count, avg_duration_seconds::float8 as avg from ai_job_metrics"
    ).fetchall()
    return {(r["job_type"], r["status"]): (int(r["count"]), r["avg"]) for r in rows}


def _counts(c: psycopg.Connection[Any]) -> dict[tuple[str, str], tuple[int, float | None]]:
    rows = c.execute("select * from ai_job_status_counts()").fetchall()
    kind = {"ai_course_jobs": "course", "ai_media_jobs": "media"}
    return {
        (kind[r["job_table"]], r["status"]): (int(r["jobs"]), r["avg_duration_seconds"])
        for r in rows
    }


def _same(c: psycopg.Connection[Any]) -> None:
    assert _counts(c) == _view(c)


def test_counts_follow_every_kind_of_change(db_url: str) -> None:
    with connect(db_url) as c:
        _same(c)
        c.execute(
            "insert into ai_course_jobs (subject, status, started_at, completed_at)"
            " select 's' || g, 'done', now() - interval '40 s', now() - g * interval '1 s'"
            " from generate_series(1, 30) g"
        )
        ids = [insert_course(c, f"live {i}") for i in range(5)]
        insert_media(c, status="dead_letter", completed_at="now()")
        _same(c)
        # The worker's path: claim, complete, fail to the dead letter.
        got = c.execute("select * from claim_jobs('ai_course_jobs', 'w', 3)").fetchall()
        c.execute(
            "select complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
            [
                [g["id"] for g in got[:2]],
                [g["claim_token"] for g in got[:2]],
                ["p", "p"],
                ["{}", "{}"],
            ],
        )
        c.execute(
            "select * from fail_job('ai_course_jobs', %s, %s, 'x', 0, true)",
            [got[2]["id"], got[2]["claim_token"]],
        )
        _same(c)
        # The runbook's functions, and the console's.
        c.execute("select requeue_job(%s, 'ai_course_jobs')", [got[0]["id"]])
        c.execute("select cancel_job(%s, 'ai_course_jobs')", [ids[4]])
        c.execute("select requeue_jobs(status => 'dead_letter')")
        _same(c)
        c.execute("update ai_course_jobs set completed_at = now() - interval '100 days'")
        c.execute("select purge_old_jobs('90 days')")
        _same(c)
        # An operator's own SQL in psql.
        c.execute("update ai_media_jobs set status = 'done', started_at = now() - interval '5 s'")
        c.execute("update ai_media_jobs set completed_at = now()")
        _same(c)
        c.execute("delete from ai_media_jobs")
        _same(c)
        insert_course(c, "x", status="cancelled")
        c.execute("select delete_jobs(status => 'cancelled')")
        _same(c)
        c.execute("select ai_job_fold_counts()")
        _same(c)
        assert c.execute("select count(*) as n from ai_job_status_deltas").fetchone() == {"n": 0}
        c.execute(
            "insert into ai_course_jobs (subject, status, started_at, completed_at)"
            " values ('t', 'done', now() - interval '3 s', now())"
        )
        c.execute("truncate ai_course_jobs")
        _same(c)
        assert _counts(c) == {}


def test_counts_hold_under_concurrent_writers(db_url: str) -> None:
    import threading

    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject) select 's' || g from generate_series(1, 400) g"
        )

    def work() -> None:
        with connect(db_url) as w:
            while True:
                got = w.execute("select * from claim_jobs('ai_course_jobs', 'w', 7)").fetchall()
                if not got:
                    return
                w.execute(
                    "select complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
                    [
                        [g["id"] for g in got],
                        [g["claim_token"] for g in got],
                        ["p"] * len(got),
                        ["{}"] * len(got),
                    ],
                )
                w.execute("select ai_job_fold_counts()")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with connect(db_url) as c:
        _same(c)
        assert _counts(c)[("course", "done")][0] == 400
