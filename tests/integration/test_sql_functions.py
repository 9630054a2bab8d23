"""Every runbook function and worker state change, against a real database."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from tests.helpers import connect, insert_course, insert_media, job


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        yield conn


def test_insert_defaults_and_course_slug(c: Any) -> None:
    jid = insert_course(c, "Algèbra Basics: Part 1!")
    row = job(c, jid)
    assert row["status"] == "pending"
    assert row["params"] == {}
    assert (row["retry_count"], row["max_retries"]) == (0, 3)
    assert row["course_id"] == "algebra-basics-part-1"
    assert row["created_at"] is not None and row["run_after"] is not None
    assert job(c, insert_course(c, "X", course_id="given"))["course_id"] == "given"
    assert job(c, insert_course(c, "!!!"))["course_id"] == "course"


@pytest.mark.parametrize(
    "insert",
    [
        lambda c: insert_course(c, "x", status="running"),
        lambda c: insert_course(c, "   "),
        lambda c: insert_course(c, "x", params=[1, 2]),
        lambda c: insert_course(c, "x", retry_count=-1),
        lambda c: insert_media(c, media_type="video"),
        lambda c: insert_media(c, prompt=""),
    ],
)
def test_check_constraints(c: Any, insert: Any) -> None:
    with pytest.raises(errors.CheckViolation):
        insert(c)


def test_mark_stale_jobs(c: Any) -> None:
    old = insert_course(c, status="processing", last_heartbeat=_ago(c, minutes=7))
    fresh = insert_course(c, status="processing", last_heartbeat=_ago(c, minutes=1))
    media = insert_media(c, status="processing", last_heartbeat=_ago(c, minutes=6))
    rows = c.execute("select * from mark_stale_jobs()").fetchall()
    got = {str(r["job_id"]): r for r in rows}
    assert set(got) == {old, media}
    assert got[old]["job_type"] == "course" and got[media]["job_type"] == "media"
    assert timedelta(minutes=7) <= got[old]["stale_duration"] < timedelta(minutes=8)
    assert job(c, old)["status"] == "stale"
    assert job(c, fresh)["status"] == "processing"
    assert c.execute("select count(*) from mark_stale_jobs('30 seconds')").fetchone()["count"] == 1


def test_move_to_dead_letter(c: Any) -> None:
    out = insert_course(c, status="failed", retry_count=3)
    left = insert_course(c, status="failed", retry_count=1)
    media = insert_media(c, status="failed", retry_count=5, max_retries=5)
    rows = c.execute("select * from move_to_dead_letter()").fetchall()
    assert {(str(r["job_id"]), r["job_type"], r["retry_count"]) for r in rows} == {
        (out, "course", 3),
        (media, "media", 5),
    }
    assert job(c, out)["status"] == "dead_letter" and job(c, out)["completed_at"] is not None
    assert job(c, left)["status"] == "failed"


def test_requeue_job_resets_and_validates(c: Any) -> None:
    jid = insert_course(c, status="dead_letter", retry_count=3, error="boom", completed_at=_ago(c))
    c.execute("select requeue_job(%s, 'ai_course_jobs')", [jid])
    row = job(c, jid)
    assert (row["status"], row["retry_count"], row["error"], row["completed_at"]) == (
        "pending",
        0,
        None,
        None,
    )

    with pytest.raises(errors.InvalidParameterValue, match="Unknown job table"):
        c.execute("select requeue_job(%s, 'jobs')", [jid])
    with pytest.raises(errors.InvalidParameterValue, match="Unknown job table"):
        c.execute("select requeue_job(%s, 'ai_course_jobs; drop table ai_media_jobs; --')", [jid])
    c.execute("select count(*) from ai_media_jobs")  # still there
    with pytest.raises(errors.NoDataFound, match="not found"):
        c.execute("select requeue_job(gen_random_uuid(), 'ai_media_jobs')")
    busy = insert_course(c, status="processing")
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="processing"):
        c.execute("select requeue_job(%s, 'ai_course_jobs')", [busy])


def test_purge_old_jobs(c: Any) -> None:
    gone = [
        insert_course(c, status="done", completed_at=_ago(c, days=100)),
        insert_course(c, status="dead_letter", completed_at=_ago(c, days=91)),
    ]
    gone_media = insert_media(c, status="done", completed_at=_ago(c, days=200))
    kept = [
        insert_course(c, status="done", completed_at=_ago(c, days=10)),
        insert_course(c, status="failed", completed_at=_ago(c, days=100)),
        insert_course(c, status="pending"),
    ]
    assert c.execute("select purge_old_jobs()").fetchone()["purge_old_jobs"] == 3
    ids = {str(r["id"]) for r in c.execute("select id from ai_course_jobs").fetchall()}
    assert ids == set(kept) and not set(gone) & ids
    assert (
        c.execute("select count(*) from ai_media_jobs where id = %s", [gone_media]).fetchone()[
            "count"
        ]
        == 0
    )
    assert c.execute("select purge_old_jobs('5 days')").fetchone()["purge_old_jobs"] == 1


def test_ai_job_metrics_view(c: Any) -> None:
    for secs in (10, 20):
        insert_course(c, status="done", started_at=_ago(c, seconds=secs), completed_at=_ago(c))
    insert_media(c)
    rows = c.execute("select * from ai_job_metrics order by job_type, status").fetchall()
    assert [(r["job_type"], r["status"], r["count"]) for r in rows] == [
        ("course", "done", 2),
        ("media", "pending", 1),
    ]
    assert 14.5 < float(rows[0]["avg_duration_seconds"]) < 15.5
    assert rows[1]["avg_duration_seconds"] is None


def test_claim_jobs_order_due_and_skip_locked(db_url: str, c: Any) -> None:
    later = insert_course(c, "later", run_after=_ago(c, seconds=-3600))
    first = insert_course(c, "first", run_after=_ago(c, seconds=60))
    second = insert_course(c, "second", run_after=_ago(c, seconds=30))
    retry = insert_media(c, status="failed", retry_count=1, run_after=_ago(c, seconds=1))
    spent = insert_media(c, status="failed", retry_count=3, run_after=_ago(c, seconds=1))

    with connect(db_url) as other, other.transaction():
        other.execute("select 1 from ai_course_jobs where id = %s for update", [first])
        rows = c.execute("select * from claim_jobs('ai_course_jobs', 'w1', 5)").fetchall()
        assert [str(r["id"]) for r in rows] == [second]  # first is locked, later not due
    row = job(c, second)
    assert row["status"] == "processing" and row["worker_id"] == "w1"
    assert row["claim_token"] is not None and row["started_at"] is not None

    rows = c.execute("select * from claim_jobs(null, 'w2', 10)").fetchall()
    assert [(r["job_table"], str(r["id"])) for r in rows] == [
        ("ai_course_jobs", first),
        ("ai_media_jobs", retry),
    ]
    assert rows[1]["job"]["prompt"] == "a cat"
    assert (
        job(c, later)["status"] == "pending"
        and job(c, spent, "ai_media_jobs")["status"] == "failed"
    )
    # the operator's nudge takes a job whatever its run_after
    rows = c.execute("select * from claim_job('ai_course_jobs', %s, 'w3')", [later]).fetchall()
    assert len(rows) == 1
    assert (
        c.execute("select * from claim_job('ai_course_jobs', %s, 'w3')", [later]).fetchall() == []
    )


def _claim(c: Any, table: str = "ai_course_jobs") -> dict[str, Any]:
    row = c.execute("select * from claim_jobs(%s, 'w', 1)", [table]).fetchone()
    assert row is not None
    return dict(row)


def test_heartbeat_complete_with_token(c: Any) -> None:
    a, b = insert_course(c, "a"), insert_course(c, "b")
    ja, jb = _claim(c), _claim(c)
    c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    held = c.execute(
        "select * from heartbeat_jobs('ai_course_jobs', %s, %s)",
        [[ja["id"], jb["id"]], [ja["claim_token"], uuid.UUID(int=1)]],
    ).fetchall()
    assert [str(r["heartbeat_jobs"]) for r in held] == [a]
    assert job(c, b)["last_heartbeat"] < job(c, a)["last_heartbeat"]

    done = c.execute(
        "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s)",
        [
            [ja["id"], jb["id"]],
            [ja["claim_token"], ja["claim_token"]],
            ["courses/a/course.json", "x"],
            [Jsonb({"provider": "p"})] * 2,
        ],
    ).fetchall()
    assert [str(r["complete_jobs"]) for r in done] == [a]
    row = job(c, a)
    assert row["status"] == "done" and row["result_path"] == "courses/a/course.json"
    assert row["metrics"] == {"provider": "p"} and row["completed_at"] is not None
    assert job(c, b)["status"] == "processing"


def test_fail_job_backoff_then_dead_letter(c: Any) -> None:
    jid = insert_course(c)
    delays = []
    for attempt in (1, 2):
        j = _claim_now(c, jid)
        row = c.execute(
            "select *, extract(epoch from run_after - clock_timestamp()) as wait"
            " from fail_job('ai_course_jobs', %s, %s, %s, 10)",
            [jid, j["claim_token"], f"boom {attempt}"],
        ).fetchone()
        assert row["status"] == "failed" and row["retry_count"] == attempt
        delays.append(row["wait"])
    assert 7.4 < delays[0] < 12.6 and 14.9 < delays[1] < 25.1  # 10 * 2^(n-1) +- 25%
    assert job(c, jid)["error"] == "boom 2"
    j = _claim_now(c, jid)
    row = c.execute(
        "select * from fail_job('ai_course_jobs', %s, %s, repeat('x', 5000), 10)",
        [jid, j["claim_token"]],
    ).fetchone()
    assert row["status"] == "dead_letter"
    final = job(c, jid)
    assert final["completed_at"] is not None and len(final["error"]) == 2000
    # a stale token changes nothing
    assert (
        c.execute(
            "select * from fail_job('ai_course_jobs', %s, %s, 'late', 10)", [jid, j["claim_token"]]
        ).fetchall()
        == []
    )


def _claim_now(c: Any, jid: str) -> dict[str, Any]:
    row = c.execute("select * from claim_job('ai_course_jobs', %s, 'w')", [jid]).fetchone()
    assert row is not None
    return dict(row)


def test_release_and_rescue(c: Any) -> None:
    a, b, z = insert_course(c, "a"), insert_course(c, "b"), insert_course(c, "z", max_retries=1)
    ja = _claim_now(c, a)
    c.execute(
        "select * from release_jobs('ai_course_jobs', %s, %s)", [[ja["id"]], [ja["claim_token"]]]
    )
    row = job(c, a)
    assert (row["status"], row["retry_count"], row["claim_token"]) == ("pending", 0, None)

    _claim_now(c, b)
    _claim_now(c, z)
    c.execute(
        "update ai_course_jobs set last_heartbeat = now() - interval '10 minutes'"
        " where status = 'processing'"
    )
    c.execute("select * from mark_stale_jobs()")
    rows = c.execute("select * from rescue_stale_jobs()").fetchall()
    assert {(str(r["job_id"]), r["status"]) for r in rows} == {(b, "pending"), (z, "dead_letter")}
    assert job(c, b)["retry_count"] == 1 and "heartbeat" in job(c, b)["error"]
    assert job(c, z)["completed_at"] is not None


def test_a_release_with_another_claims_token_changes_nothing(c: Any) -> None:
    """A worker that lost its job (rescued, claimed again elsewhere) releases it
    late: only the claim whose token it holds may be given back."""
    jid = insert_course(c, "claimed again")
    first = _claim_now(c, jid)
    c.execute("update ai_course_jobs set status = 'pending', claim_token = null")
    second = _claim_now(c, jid)
    rows = c.execute(
        "select * from release_jobs('ai_course_jobs', %s, %s)", [[jid], [first["claim_token"]]]
    ).fetchall()
    assert rows == []
    row = job(c, jid)
    assert (row["status"], row["claim_token"]) == ("processing", second["claim_token"])


@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
def test_no_claim_takes_a_failed_job_with_no_attempt_left(c: Any, table: str) -> None:
    """A failed job whose attempts are spent (max_retries lowered, or before the
    sweep moves it to the dead letter) is claimed by no claim function."""
    insert = insert_course if table == "ai_course_jobs" else insert_media
    spent = insert(c, status="failed", retry_count=2, max_retries=2)
    due = insert(c, status="failed", retry_count=1, max_retries=2)
    claimed = c.execute("select id from claim_jobs(%s, 'w', 10)", [table]).fetchall()
    assert [str(r["id"]) for r in claimed] == [due]
    assert c.execute("select * from claim_due_job(%s, %s, 'w')", [table, spent]).fetchall() == []
    both = c.execute(
        "select id from complete_and_claim(%s, 'w', 10, '{}', '{}', '{}', '{}')", [table]
    ).fetchall()
    assert both == []
    assert job(c, spent, table)["status"] == "failed"


@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
def test_the_fast_claim_takes_nothing_from_a_paused_table(c: Any, table: str) -> None:
    insert = insert_course if table == "ai_course_jobs" else insert_media
    jid = insert(c)
    c.execute("select pause_jobs(%s)", [table])
    assert c.execute("select * from claim_due_job(%s, %s, 'w')", [table, jid]).fetchall() == []
    assert job(c, jid, table)["status"] == "pending"
    c.execute("select resume_jobs(%s)", [table])
    rows = c.execute("select id from claim_due_job(%s, %s, 'w')", [table, jid]).fetchall()
    assert [str(r["id"]) for r in rows] == [jid]


def test_next_job_due(c: Any) -> None:
    assert c.execute("select next_job_due()").fetchone()["next_job_due"] is None
    insert_media(c, status="failed", retry_count=1, run_after=_ago(c, seconds=-30))
    insert_course(c, run_after=_ago(c, seconds=-60))
    row = c.execute("select extract(epoch from next_job_due() - now()) as s").fetchone()
    assert 29 < row["s"] <= 30


def test_claim_stays_an_index_lookup_with_many_finished_rows(c: Any) -> None:
    c.execute(
        "insert into ai_course_jobs (subject, status, completed_at)"
        " select 's' || g, 'done', now() from generate_series(1, 20000) g"
    )
    insert_course(c)
    c.execute("analyze ai_course_jobs")
    plan = "\n".join(
        r["QUERY PLAN"]
        for r in c.execute(
            "explain select id from ai_course_jobs where status in ('pending', 'failed')"
            " and run_after <= now() and (status = 'pending' or retry_count < max_retries)"
            " order by run_after limit 10 for update skip locked"
        ).fetchall()
    )
    assert "ai_course_jobs_claim_idx" in plan, plan
    plan = "\n".join(
        r["QUERY PLAN"]
        for r in c.execute(
            "explain select id from ai_course_jobs where status = 'processing'"
            " and last_heartbeat < now() - interval '5 minutes'"
        ).fetchall()
    )
    assert "ai_course_jobs_running_idx" in plan, plan


COMPLETE = {
    "complete_jobs": "select complete_jobs as id from complete_jobs(%s, %s, %s, %s, %s)",
    "complete_and_claim": "select id from complete_and_claim(%s, 'w', 0, %s, %s, %s, %s)"
    " where kind = 'done'",
}


@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
@pytest.mark.parametrize("fn", sorted(COMPLETE))
def test_completion_writes_each_job_what_its_own_token_carries(c: Any, fn: str, table: str) -> None:
    """Each job gets the path and metrics sent beside its id and token, in whatever
    order they come; a stranger, a wrong token, and a null token (beside a row
    whose token is null) write nothing."""
    for _ in range(4):
        if table == "ai_course_jobs":
            insert_course(c)
        else:
            insert_media(c)
    a, b, x, y = (_claim(c, table) for _ in range(4))
    c.execute(f"update {table} set claim_token = null where id = %s", [y["id"]])
    ids = [b["id"], uuid.uuid4(), a["id"], x["id"], y["id"]]
    tokens = [b["claim_token"], uuid.uuid4(), a["claim_token"], uuid.uuid4(), None]
    metrics = [Jsonb({"n": n}) for n in range(5)]
    rows = c.execute(COMPLETE[fn], [table, ids, tokens, ["pb", "p?", "pa", "px", "py"], metrics])
    assert sorted(str(r["id"]) for r in rows) == sorted(str(j["id"]) for j in (a, b))
    for j, path, n in ((b, "pb", 0), (a, "pa", 2)):
        row = job(c, str(j["id"]), table)
        assert (row["status"], row["result_path"], row["metrics"]) == ("done", path, {"n": n})
    for j in (x, y):
        assert job(c, str(j["id"]), table)["status"] == "processing"


@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
def test_complete_and_claim_finishes_but_claims_nothing_in_a_paused_table(
    c: Any, table: str
) -> None:
    """The busy loop's completion-and-claim honours pause_jobs like claim_jobs:
    the jobs that finished are written, nothing new is handed out."""
    insert = insert_course if table == "ai_course_jobs" else insert_media
    insert(c)
    held = _claim(c, table)
    waiting = [insert(c) for _ in range(2)]
    c.execute("select pause_jobs(%s)", [table])
    call = "select * from complete_and_claim(%s, 'w', 5, %s, %s, %s, %s)"
    done = [[held["id"]], [held["claim_token"]], ["p"], [Jsonb({})]]
    rows = c.execute(call, [table, *done]).fetchall()
    assert [(r["kind"], r["id"]) for r in rows] == [("done", held["id"])]
    assert job(c, str(held["id"]), table)["status"] == "done"
    assert [job(c, jid, table)["status"] for jid in waiting] == ["pending", "pending"]
    c.execute("select resume_jobs(%s)", [table])
    rows = c.execute(call, [table, [], [], [], []]).fetchall()
    assert sorted(str(r["id"]) for r in rows if r["kind"] == "claimed") == sorted(waiting)


def _ago(c: Any, *, days: float = 0, minutes: float = 0, seconds: float = 0) -> Any:
    row = c.execute(
        "select now() - make_interval(days => %s, mins => %s, secs => %s) as t",
        [int(days), int(minutes), seconds],
    ).fetchone()
    return row["t"]


def test_complete_and_claim_in_one_transaction(c: Any) -> None:
    a, b, z = insert_course(c, "a"), insert_course(c, "b"), insert_course(c, "z")
    ja = _claim(c)
    rows = c.execute(
        "select * from complete_and_claim('ai_course_jobs', 'w', 5, %s, %s, %s, %s)",
        [
            [ja["id"], uuid.uuid4()],
            [ja["claim_token"], uuid.uuid4()],
            ["p", "q"],
            [Jsonb({}), Jsonb({})],
        ],
    ).fetchall()
    assert [(r["kind"], str(r["id"])) for r in rows] == [
        ("done", a),
        ("claimed", b),
        ("claimed", z),
    ]
    assert job(c, a)["status"] == "done" and job(c, a)["result_path"] == "p"
    assert rows[1]["job"]["subject"] == "b" and rows[1]["claim_token"] is not None
