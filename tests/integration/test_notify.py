"""NOTIFY on channel ai_jobs, committed for real."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from tests.helpers import connect, insert_course


def _drain(listener: psycopg.Connection[Any], timeout: float = 0.5) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout, stop_after=None)]


def _listener(db_url: str) -> psycopg.Connection[Any]:
    listener = psycopg.connect(db_url, autocommit=True)
    listener.execute("listen ai_jobs")
    return listener


def test_insert_notifies_with_table_and_id(db_url: str) -> None:
    with _listener(db_url) as listener, connect(db_url) as c:
        jid = insert_course(c)
        (payload,) = listener.notifies(timeout=5, stop_after=1)
        assert json.loads(payload.payload) == {"table": "ai_course_jobs", "id": jid}
        assert payload.channel == "ai_jobs"


def test_bulk_insert_sends_one_notification(db_url: str) -> None:
    with _listener(db_url) as listener, connect(db_url) as c:
        c.execute(
            "insert into ai_media_jobs (prompt, media_type)"
            " select 'p' || g, 'image' from generate_series(1, 10000) g"
        )
        assert [json.loads(p) for p in _drain(listener)] == [
            {"table": "ai_media_jobs", "count": 10000}
        ]


def test_rolled_back_insert_does_not_notify(db_url: str) -> None:
    with _listener(db_url) as listener, connect(db_url) as c:
        with c.transaction(force_rollback=True):
            insert_course(c)
        assert _drain(listener) == []


def test_requeue_notifies_and_worker_updates_do_not(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c)
        with _listener(db_url) as listener:
            row = c.execute("select * from claim_jobs('ai_course_jobs', 'w', 1)").fetchone()
            c.execute(
                "select * from heartbeat_jobs('ai_course_jobs', %s, %s)",
                [[row["id"]], [row["claim_token"]]],
            )
            c.execute(
                "select * from fail_job('ai_course_jobs', %s, %s, 'x', 10)",
                [row["id"], row["claim_token"]],
            )
            assert _drain(listener) == []
            c.execute("select requeue_job(%s, 'ai_course_jobs')", [jid])
            assert [json.loads(p) for p in _drain(listener)] == [{"table": "ai_course_jobs"}]


def test_bulk_requeue_folds_into_one_notification(db_url: str) -> None:
    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject, status, retry_count)"
            " select 's' || g, 'dead_letter', 3 from generate_series(1, 500) g"
        )
        with _listener(db_url) as listener:
            c.execute("update ai_course_jobs set status = 'pending'")
            assert [json.loads(p) for p in _drain(listener)] == [{"table": "ai_course_jobs"}]
