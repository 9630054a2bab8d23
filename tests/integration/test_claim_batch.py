"""ai_job_claim_batch (sql/033): the batch jobs of a table alone, claimed while a
per-minute quota holds its other claims. Which jobs (batch ones; of the media
table, images only), oldest first, and every rule of a claim kept: paused
queues, the per-user cap, rows another claim holds, an unknown table."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from tests.helpers import connect, insert_course, insert_media, job, wait_until


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        conn.execute("update ai_job_settings set rate_limit_per_hour = 100000")
        yield conn


def claim_batch(c: Any, table: str = "ai_course_jobs", n: int = 10, worker: str = "w1") -> Any:
    return c.execute("select * from ai_job_claim_batch(%s, %s, %s)", [table, worker, n]).fetchall()


def older(c: Any, seconds: int) -> Any:
    return c.execute("select now() - %s * interval '1 second' as t", [seconds]).fetchone()["t"]


def test_only_batch_jobs_oldest_first_with_their_batch_flag(c: Any) -> None:
    direct = [insert_course(c, f"Direct {i}", run_after=older(c, 100 - i)) for i in range(3)]
    young = insert_course(c, "Young", batch=True, run_after=older(c, 10))
    old = insert_course(c, "Old", batch=True, run_after=older(c, 50))
    later = insert_course(c, "Later", batch=True, run_after=older(c, -3600))  # not due
    rows = claim_batch(c, n=1)
    assert [str(r["id"]) for r in rows] == [old]
    (r,) = rows
    assert r["job_table"] == "ai_course_jobs" and r["job"]["batch"] is True
    assert r["job"]["subject"] == "Old" and r["retry_count"] == 0
    assert job(c, old)["status"] == "processing" and job(c, old)["worker_id"] == "w1"
    assert job(c, old)["claim_token"] == r["claim_token"]
    assert [str(r["id"]) for r in claim_batch(c)] == [young]
    assert claim_batch(c) == []
    assert {job(c, i)["status"] for i in [*direct, later]} == {"pending"}


def test_media_batch_jobs_are_images_only(c: Any) -> None:
    image = insert_media(c, "a cat", "image", batch=True)
    insert_media(c, "a purr", "audio", batch=True)  # no Batch API for speech: runs direct
    insert_media(c, "a dog", "image")
    rows = claim_batch(c, "ai_media_jobs")
    assert [str(r["id"]) for r in rows] == [image]
    assert rows[0]["job"]["batch"] is True and rows[0]["job"]["media_type"] == "image"
    assert claim_batch(c, "ai_media_jobs") == []


def test_a_failed_batch_job_with_retries_left_is_claimed_and_one_out_of_them_is_not(
    c: Any,
) -> None:
    retry = insert_course(c, "Retry", batch=True)
    spent = insert_course(c, "Spent", batch=True)
    c.execute(
        "update ai_course_jobs set status = 'failed', retry_count = 1, max_retries = 3,"
        " run_after = now() - interval '1 second' where id = %s",
        [retry],
    )
    c.execute(
        "update ai_course_jobs set status = 'failed', retry_count = 3, max_retries = 3"
        " where id = %s",
        [spent],
    )
    assert [str(r["id"]) for r in claim_batch(c)] == [retry]


def test_a_paused_queue_gives_nothing(c: Any) -> None:
    insert_course(c, "Batched", batch=True)
    c.execute("select pause_jobs('ai_course_jobs')")
    assert claim_batch(c) == []
    c.execute("select resume_jobs('ai_course_jobs')")
    assert len(claim_batch(c)) == 1


def test_the_per_user_cap_holds_and_a_user_at_it_does_not_block_others(c: Any) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    a_jobs = [
        insert_course(c, f"A {i}", batch=True, created_by=a, run_after=older(c, 100 - i))
        for i in range(5)
    ]
    b_jobs = [
        insert_course(c, f"B {i}", batch=True, created_by=b, run_after=older(c, 50 - i))
        for i in range(2)
    ]
    insert_media(c, "A's image", "image", created_by=a)  # one of A's, processing: at cap 2
    c.execute("update ai_media_jobs set status = 'processing'")
    c.execute("update ai_job_settings set max_running_per_user = 2")
    rows = claim_batch(c)
    assert sorted(str(r["id"]) for r in rows) == sorted([a_jobs[0], *b_jobs])
    assert claim_batch(c) == []  # both at the cap now
    c.execute("update ai_job_settings set max_running_per_user = null")
    assert sorted(str(r["id"]) for r in claim_batch(c, n=3)) == sorted(a_jobs[1:4])


def test_rows_another_claim_holds_are_skipped(db_url: str, c: Any) -> None:
    first = insert_course(c, "First", batch=True, run_after=older(c, 20))
    second = insert_course(c, "Second", batch=True, run_after=older(c, 10))
    with psycopg.connect(db_url) as other:
        other.execute("select id from ai_course_jobs where id = %s for update", [first])
        assert [str(r["id"]) for r in claim_batch(c)] == [second]
        other.rollback()
    assert [str(r["id"]) for r in claim_batch(c)] == [first]


@pytest.mark.parametrize("table", ["ai_job_batches", "ai_course_jobs; drop table x", None])
def test_an_unknown_table_is_refused(c: Any, table: Any) -> None:
    insert_course(c, "Batched", batch=True)
    with pytest.raises(psycopg.Error) as exc:
        claim_batch(c, table)
    assert "table" in str(exc.value)
    assert c.execute("select status from ai_course_jobs").fetchone()["status"] == "pending"


@pytest.mark.parametrize("n", [0, -1, None])
def test_no_room_claims_nothing(c: Any, n: Any) -> None:
    insert_course(c, "Batched", batch=True)
    assert claim_batch(c, n=n) == []


def test_two_capped_batch_claims_at_once_never_deadlock(db_url: str, c: Any) -> None:
    """Jobs A1, B1, B2, A2 (users A and B), a cap set. Taken one job at a time
    with each user's lock as it comes, worker 1 would hold A and wait for B (for
    B2) while worker 2 held B and waited for A (for A2): a deadlock, one claim
    aborted. Every due user's lock is taken first, in one order (sql/035)."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    order = [(a, "A1"), (b, "B1"), (b, "B2"), (a, "A2")]
    ids = [
        insert_course(c, name, batch=True, created_by=user, run_after=older(c, 100 - i))
        for i, (user, name) in enumerate(order)
    ]
    c.execute("update ai_job_settings set max_running_per_user = 5")
    claim = "select id::text from ai_job_claim_batch('ai_course_jobs', %s, 1)"
    got: dict[str, list[str]] = {"w1": [], "w2": []}
    errors: list[BaseException] = []
    go = threading.Event()

    def waits_on_a_lock(pid: int) -> bool:
        row = c.execute(
            "select wait_event_type from pg_stat_activity where pid = %s", [pid]
        ).fetchone()
        return row is not None and row["wait_event_type"] == "Lock"

    with psycopg.connect(db_url) as w1, psycopg.connect(db_url) as w2:

        def second_worker() -> None:
            try:
                got["w2"] += [r[0] for r in w2.execute(claim, ["w2"]).fetchall()]
                go.wait(15)
                got["w2"] += [r[0] for r in w2.execute(claim, ["w2"]).fetchall()]
                w2.commit()
            except BaseException as exc:
                errors.append(exc)
                w2.rollback()

        got["w1"] += [r[0] for r in w1.execute(claim, ["w1"]).fetchall()]  # A1
        t2 = threading.Thread(target=second_worker)
        t2.start()
        wait_until(
            lambda: got["w2"] or waits_on_a_lock(w2.info.backend_pid) or errors,
            what="worker 2's first claim done, or waiting for worker 1's locks",
        )

        def first_worker_again() -> None:
            try:
                got["w1"] += [r[0] for r in w1.execute(claim, ["w1"]).fetchall()]
                w1.commit()
            except BaseException as exc:
                errors.append(exc)
                w1.rollback()

        t1 = threading.Thread(target=first_worker_again)
        t1.start()
        wait_until(
            lambda: not t1.is_alive() or waits_on_a_lock(w1.info.backend_pid),
            what="worker 1's second claim done, or waiting",
        )
        go.set()
        t1.join(20)
        t2.join(20)
    assert errors == []
    claimed = got["w1"] + got["w2"]
    assert len(claimed) == 4 and set(claimed) == set(ids)
