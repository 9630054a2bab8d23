"""triggers/007, sql/024: ai_jobs_events notifications per statement that changed
jobs, never per row: an insert or a delete names its table, an update the ids of
the jobs whose status or progress changed, 200 to a notification."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.helpers import connect, insert_course

CHUNK = 200  # ids per notification (sql/024)


def _listener(db_url: str) -> psycopg.Connection[Any]:
    listener = psycopg.connect(db_url, autocommit=True)
    listener.execute("listen ai_jobs_events")
    return listener


def _drain(listener: psycopg.Connection[Any], timeout: float = 0.4) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout, stop_after=None)]


def _ids(payloads: list[str], table: str = "ai_course_jobs") -> list[str]:
    """The ids named by update notifications of one table, in order."""
    found = []
    for p in payloads:
        name, *ids = p.split(" ")
        assert name == table and ids, p
        assert len(ids) <= CHUNK and len(p) < 8000
        found += ids
    return found


def test_batch_status_changes_notify_once_per_statement(db_url: str) -> None:
    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject) select 's' || g from generate_series(1, 500) g"
        )
        with _listener(db_url) as listener:
            rows = c.execute("select * from claim_jobs('ai_course_jobs', 'w', 500)").fetchall()
            assert len(rows) == 500
            ids = [r["id"] for r in rows]
            claimed = _drain(listener)
            assert len(claimed) == 3  # 200 + 200 + 100
            assert sorted(_ids(claimed)) == sorted(str(i) for i in ids)

            tokens = [r["claim_token"] for r in rows]
            # A heartbeat changes no status: silent, however many jobs run.
            c.execute("select * from heartbeat_jobs('ai_course_jobs', %s, %s)", [ids, tokens])
            # A claim that finds nothing due is silent too.
            c.execute("select * from claim_jobs(null, 'w', 10)")
            assert _drain(listener) == []

            # Progress is a change a watcher wants: the jobs written are named.
            c.execute(
                "select * from progress_jobs('ai_course_jobs', %s, %s, %s::jsonb[])",
                [ids[:3], tokens[:3], ['{"percent": 10}'] * 3],
            )
            assert sorted(_ids(_drain(listener))) == sorted(str(i) for i in ids[:3])
            # ... and the same progress again (a heartbeat's) changes nothing but updatedAt
            c.execute("select * from heartbeat_jobs('ai_course_jobs', %s, %s)", [ids, tokens])
            assert _drain(listener) == []

            c.execute(
                "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
                [ids, tokens, ["p"] * 500, ["{}"] * 500],
            )
            assert len(_ids(_drain(listener))) == 500


def test_insert_delete_and_transactions_fold(db_url: str) -> None:
    with connect(db_url) as c, _listener(db_url) as listener:
        with c.transaction():
            for _ in range(20):
                insert_course(c)
            c.execute("insert into ai_media_jobs (prompt, media_type) values ('p', 'image')")
        # Identical payloads of one transaction fold into one notification per table.
        assert sorted(_drain(listener)) == ["ai_course_jobs", "ai_media_jobs"]

        c.execute("delete from ai_media_jobs")
        assert _drain(listener) == ["ai_media_jobs"]
        c.execute("delete from ai_media_jobs")  # nothing left: silent
        assert _drain(listener) == []

        with c.transaction(force_rollback=True):
            insert_course(c)
        assert _drain(listener) == []
