"""The batches' state changes (sql/027) against a real database: who may take a
job into a batch, the lease and its takeover, the heartbeats it keeps, and the
end that sends the unfinished jobs back without an attempt."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.helpers import connect, insert_course, job


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        yield conn


def claim(c: Any, worker: str = "w1") -> dict[str, Any]:
    row = c.execute("select * from claim_jobs('ai_course_jobs', %s, 1)", [worker]).fetchone()
    assert row is not None
    return dict(row)


def take(c: Any, claimed: dict[str, Any], worker: str = "w1", token: Any = None) -> Any:
    row = c.execute(
        "select ai_job_batch_take('ai_course_jobs', %s, %s, %s, 60, 1000) as b",
        [claimed["id"], token or claimed["claim_token"], worker],
    ).fetchone()
    return row["b"]


def watch(c: Any, worker: str, lease: float = 60) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in c.execute(
            "select * from ai_job_batch_watch(%s, %s, 20, 0)", [worker, lease]
        ).fetchall()
    ]


def test_only_a_held_batch_job_is_taken(c: Any) -> None:
    insert_course(c, "Direct")
    assert take(c, claim(c)) is None  # batch = false: run it directly
    insert_course(c, "Batched", batch=True)
    claimed = claim(c)
    assert take(c, claimed, token=uuid.uuid4()) is None  # not its claim
    b = take(c, claimed)
    assert b is not None
    row = job(c, str(claimed["id"]))
    assert row["status"] == "processing" and row["progress"]["phase"] == "batched"
    assert row["claim_token"] != claimed["claim_token"]  # the worker's writes are refused now
    done = c.execute(
        "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s)",
        [[claimed["id"]], [claimed["claim_token"]], ["x"], [None]],
    ).fetchall()
    assert done == []
    assert take(c, claimed) is None  # its old token again: nothing


def test_a_worker_collects_into_one_batch_and_a_rescued_job_rejoins_it(c: Any) -> None:
    for i in range(3):
        insert_course(c, f"Batched {i}", batch=True)
    batches = {take(c, claim(c)) for _ in range(3)}
    assert len(batches) == 1
    (b,) = batches
    # Its worker is gone long enough for the stale rescue: the job comes back...
    c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    c.execute("select mark_stale_jobs('1 minute')")
    c.execute("select rescue_stale_jobs(10)")
    again = claim(c, "w2")
    assert take(c, again, "w2") == b  # ... and joins its open batch, not a new one
    items = c.execute("select count(*) as n from ai_job_batch_items").fetchone()["n"]
    assert items == 3


def test_the_lease_is_taken_over_and_the_heartbeats_kept(c: Any) -> None:
    insert_course(c, "Batched", batch=True)
    claimed = claim(c)
    b = take(c, claimed)
    assert [r["id"] for r in watch(c, "w1")] == [b]
    assert watch(c, "w2") == []  # w1's lease holds
    c.execute("update ai_job_batches set lease_until = now() - interval '1 second'")
    c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    (row,) = watch(c, "w2")
    assert row["id"] == b and row["state"] == "collecting" and row["jobs"] == 1
    assert watch(c, "w1") == []  # no longer w1's
    beat = job(c, str(claimed["id"]))["last_heartbeat"]
    stale = c.execute("select count(*) as n from mark_stale_jobs('1 minute')").fetchone()
    assert stale["n"] == 0 and beat is not None


def test_the_end_sends_unfinished_jobs_back_without_an_attempt(c: Any) -> None:
    for i in range(2):
        insert_course(c, f"Batched {i}", batch=True)
    first, second = claim(c), claim(c)
    b = take(c, first)
    take(c, second)
    jobs = c.execute(
        "select * from ai_job_batch_submitting(%s, 'w1', 'openai', 'gpt-4.1-mini')", [b]
    ).fetchall()
    assert {r["id"] for r in jobs} == {first["id"], second["id"]}
    assert (
        c.execute(
            "select ai_job_batch_submitted(%s, 'w2', 'batch_x', 'file_x') as ok", [b]
        ).fetchone()["ok"]
        is False
    )  # not the lease holder
    assert c.execute(
        "select ai_job_batch_submitted(%s, 'w1', 'batch_x', 'file_x') as ok", [b]
    ).fetchone()["ok"]
    c.execute("select cancel_job(%s, 'ai_course_jobs')", [first["id"]])
    held = c.execute("select * from ai_job_batch_jobs(%s, 'w1')", [b]).fetchall()
    assert [r["id"] for r in held] == [second["id"]]
    n = c.execute("select ai_job_batch_end(%s, 'w1', 'expired', 'expired') as n", [b]).fetchone()
    assert n["n"] == 1
    back = job(c, str(second["id"]))
    assert back["status"] == "pending" and back["retry_count"] == 0 and back["batch"] is False
    assert job(c, str(first["id"]))["status"] == "cancelled"
    ended = c.execute("select state, outcome from ai_job_batches").fetchone()
    assert (ended["state"], ended["outcome"]) == ("ended", "expired")
