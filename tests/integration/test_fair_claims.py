"""Fair claims and the per-user cap (sql/025), through the real claim functions:
the order of claims between users, the null user, the cap under concurrent
claimers, the notified job of a capped user, the cap changed at runtime, and
bad values of the setting."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from typing import Any

import pytest
from psycopg import errors

from listener.jobs import Job, Outcome
from tests.helpers import await_until, connect, insert_course, insert_media, job
from tests.workers import running_worker, settings

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
C = "cccccccc-0000-4000-8000-000000000003"

RUNNING = """
select coalesce(created_by, '00000000-0000-0000-0000-000000000000')::text as who, count(*)::int as n
from (select created_by from ai_course_jobs where status = 'processing'
      union all
      select created_by from ai_media_jobs where status = 'processing') r
group by 1
"""


@pytest.fixture
def c(db_url: str) -> Any:
    with connect(db_url) as conn:
        conn.execute("update ai_job_settings set rate_limit_per_hour = 100000")
        yield conn


def _add(c: Any, user: str | None, n: int, name: str, *, media: bool = False) -> list[str]:
    """n due jobs of `user`, named name1..nameN, each a second younger than the last
    (the first one an hour old plus whatever was added before)."""
    ids = []
    for i in range(1, n + 1):
        at = c.execute(
            "select now() - interval '1 hour' + %s * interval '1 second' as t", [_tick()]
        )
        run_after = at.fetchone()["t"]
        if media:
            ids.append(insert_media(c, f"{name}{i}", created_by=user, run_after=run_after))
        else:
            ids.append(insert_course(c, f"{name}{i}", created_by=user, run_after=run_after))
    return ids


_ticks = iter(range(1, 1_000_000))


def _tick() -> int:
    return next(_ticks)


def _claim(c: Any, n: int = 1, table: str | None = "ai_course_jobs") -> list[str]:
    """The names of the jobs claimed, sorted (a claim returns its rows in no order)."""
    rows = c.execute("select * from claim_jobs(%s, 'w', %s)", [table, n]).fetchall()
    return sorted(r["job"].get("subject") or r["job"].get("prompt") for r in rows)


def _running(c: Any) -> dict[str, int]:
    return {r["who"]: r["n"] for r in c.execute(RUNNING).fetchall()}


def _finish(c: Any, table: str, job_id: str) -> None:
    token = job(c, job_id, table)["claim_token"]
    done = c.execute(
        "select * from complete_jobs(%s, %s, %s, %s, %s)",
        [table, [job_id], [token], ["x"], [None]],
    ).fetchall()
    assert len(done) == 1


def _cap(c: Any, cap: int | None) -> None:
    c.execute("update ai_job_settings set max_running_per_user = %s", [cap])


# -- the order ------------------------------------------------------------------


def test_three_users_interleave_by_fewest_processing_oldest_first(c: Any) -> None:
    _add(c, A, 6, "A")  # the oldest, and the most
    _add(c, B, 2, "B")
    _add(c, C, 2, "C")
    # One at a time: each claim goes to the user with the fewest running (ties:
    # the oldest job), oldest first within a user.
    got = [_claim(c)[0] for _ in range(3)]
    assert got == ["A1", "B1", "C1"]
    # A batch takes the same order: every user at 1, then A alone.
    assert _claim(c, 5) == ["A2", "A3", "A4", "B2", "C2"]
    assert _running(c) == {A: 4, B: 2, C: 2}
    assert _claim(c, 5) == ["A5", "A6"]
    assert _claim(c, 5) == []


def test_a_user_with_many_running_yields_to_a_newcomer(c: Any) -> None:
    _add(c, A, 5, "A")
    assert _claim(c, 3) == ["A1", "A2", "A3"]  # A alone: the plain order
    _add(c, B, 2, "B")  # younger than every job of A
    assert _claim(c) == ["B1"]  # B runs none, A three
    assert _claim(c) == ["B2"]
    assert _claim(c) == ["A4"]  # B at 2, A at 3: B's none left


def test_the_processing_count_spans_both_tables(c: Any) -> None:
    _add(c, A, 2, "mA", media=True)
    _add(c, A, 2, "A")
    _add(c, B, 2, "B")
    assert _claim(c, 2, "ai_media_jobs") == ["mA1", "mA2"]  # A runs two media jobs
    assert _claim(c, 2) == ["B1", "B2"]  # so B's course jobs go first, though younger


def test_null_created_by_is_one_user(c: Any) -> None:
    _add(c, None, 3, "N")  # system jobs, the oldest
    _add(c, B, 1, "B")
    _add(c, None, 1, "M")  # another system job: the same user as N
    assert _claim(c) == ["N1"]
    assert _claim(c) == ["B1"]  # the null user runs one: B's turn
    assert _claim(c, 3) == ["M1", "N2", "N3"]
    assert _running(c) == {"00000000-0000-0000-0000-000000000000": 4, B: 1}


def test_one_user_takes_the_plain_order(c: Any) -> None:
    ids = _add(c, A, 3, "A")
    assert c.execute("select ai_job_one_user_due('ai_course_jobs') as one").fetchone()["one"]
    _add(c, None, 1, "N")
    assert not c.execute("select ai_job_one_user_due('ai_course_jobs') as one").fetchone()["one"]
    assert _claim(c, 10) == ["A1", "A2", "A3", "N1"]
    assert all(job(c, i)["status"] == "processing" for i in ids)


# -- the cap ----------------------------------------------------------------------


def test_the_cap_holds_a_user_back_and_lets_others_through(c: Any) -> None:
    _cap(c, 2)
    a = _add(c, A, 4, "A")
    _add(c, B, 1, "B")
    assert _claim(c, 10) == ["A1", "A2", "B1"]
    assert _claim(c, 10) == []
    assert [job(c, i)["status"] for i in a] == ["processing", "processing", "pending", "pending"]
    _finish(c, "ai_course_jobs", a[0])
    assert _claim(c, 10) == ["A3"]  # one of A's ended: one more of A's


def test_the_cap_counts_both_tables_and_every_claim_path(c: Any) -> None:
    _cap(c, 1)
    m = _add(c, A, 1, "mA", media=True)
    a = _add(c, A, 2, "A")
    assert _claim(c, 5, "ai_media_jobs") == ["mA1"]
    assert _claim(c, 5) == []  # A runs a media job: no course job
    assert _claim(c, 5, None) == []  # run-once's claim, over both tables
    due = c.execute("select * from claim_due_job('ai_course_jobs', %s, 'w')", [a[0]]).fetchall()
    assert due == []
    assert c.execute("select * from claim_job('ai_course_jobs', %s, 'w')", [a[0]]).fetchall() == []
    token = job(c, m[0], "ai_media_jobs")["claim_token"]
    rows = c.execute(
        "select kind, job->>'subject' as subject from complete_and_claim("
        "'ai_media_jobs', 'w', 5, %s, %s, %s, %s)",
        [[m[0]], [token], ["x"], [None]],
    ).fetchall()
    assert [r["kind"] for r in rows] == ["done"]
    # The media job ended: A's slot is free for the course job.
    assert _claim(c, 5, None) == ["A1"]
    assert job(c, a[1])["status"] == "pending"


def test_the_notified_job_of_a_capped_user_waits_for_a_slot(c: Any) -> None:
    _cap(c, 1)
    first, second = _add(c, A, 2, "A")
    assert _claim(c) == ["A1"]
    got = c.execute("select * from claim_due_job('ai_course_jobs', %s, 'w')", [second]).fetchall()
    assert got == [] and job(c, second)["status"] == "pending"
    _finish(c, "ai_course_jobs", first)
    got = c.execute("select * from claim_due_job('ai_course_jobs', %s, 'w')", [second]).fetchall()
    assert [r["id"] for r in got] == [uuid.UUID(second)]
    # A forged id, capped or not, claims nothing and raises nothing.
    forged = str(uuid.uuid4())
    assert (
        c.execute("select * from claim_due_job('ai_media_jobs', %s, 'w')", [forged]).fetchall()
        == []
    )


def test_the_cap_changed_at_runtime(c: Any) -> None:
    a = _add(c, A, 6, "A")
    assert _claim(c, 3) == ["A1", "A2", "A3"]  # no cap
    _cap(c, 2)
    assert _claim(c, 3) == []  # A runs 3, over the new cap: nothing more
    _finish(c, "ai_course_jobs", a[0])
    assert _claim(c, 3) == []  # 2 running: still at the cap
    _finish(c, "ai_course_jobs", a[1])
    assert _claim(c, 3) == ["A4"]
    _cap(c, None)
    assert _claim(c, 3) == ["A5", "A6"]


@pytest.mark.parametrize("bad", [0, -1, -2147483648])
def test_a_cap_below_one_is_refused(c: Any, bad: int) -> None:
    _cap(c, 3)
    with pytest.raises(errors.CheckViolation) as exc:
        _cap(c, bad)
    assert "ai_job_settings_max_running_per_user_check" in str(exc.value)
    assert c.execute("select max_running_per_user as n from ai_job_settings").fetchone()["n"] == 3


def test_a_cap_that_is_not_an_integer_is_refused(c: Any) -> None:
    for bad in ("two", "1.5", "99999999999"):
        with pytest.raises(errors.DataError):
            c.execute("update ai_job_settings set max_running_per_user = %s::text::int", [bad])
    assert (
        c.execute("select max_running_per_user as n from ai_job_settings").fetchone()["n"] is None
    )


# -- under concurrency --------------------------------------------------------------


def test_the_cap_holds_under_eight_concurrent_claimers(db_url: str, c: Any) -> None:
    """8 connections claim at once through claim_jobs, complete_and_claim and
    claim_due_job, in both tables, each claim's transaction held open a while so
    that claims overlap; no user ever has more than the cap processing."""
    cap = 2
    _cap(c, cap)
    users = [A, B, C, None]
    jobs: list[tuple[str, str]] = []
    for u in users:
        jobs += [("ai_course_jobs", i) for i in _add(c, u, 12, "c")]
        jobs += [("ai_media_jobs", i) for i in _add(c, u, 6, "m", media=True)]
    total = len(jobs)
    violations: list[dict[str, int]] = []
    peak: dict[str, int] = {}
    errors_seen: list[BaseException] = []
    stop = threading.Event()
    start = threading.Barrier(9)

    def check(conn: Any) -> None:
        now = _running(conn)
        for who, n in now.items():
            peak[who] = max(peak.get(who, 0), n)
        if any(n > cap for n in now.values()):
            violations.append(now)

    def monitor() -> None:
        with connect(db_url) as conn:
            start.wait()
            while not stop.is_set():
                check(conn)

    def claimer(k: int) -> None:
        rnd = random.Random(k)
        held: list[tuple[str, str, Any]] = []
        try:
            with connect(db_url) as conn:
                start.wait()
                while not stop.is_set():
                    table = rnd.choice(["ai_course_jobs", "ai_media_jobs"])
                    how = rnd.choice(["claim", "complete_and_claim", "due"])
                    mine = [h for h in held if h[0] == table] if how == "complete_and_claim" else []
                    with conn.transaction():
                        if how == "claim":
                            rows = conn.execute(
                                "select * from claim_jobs(%s, %s, 2)", [table, f"w{k}"]
                            ).fetchall()
                        elif how == "due":
                            jid = rnd.choice([j for t, j in jobs if t == table])
                            rows = conn.execute(
                                "select * from claim_due_job(%s, %s, %s)", [table, jid, f"w{k}"]
                            ).fetchall()
                        else:
                            rows = conn.execute(
                                "select * from complete_and_claim(%s, %s, 2, %s, %s, %s, %s)"
                                " where kind = 'claimed'",
                                [
                                    table,
                                    f"w{k}",
                                    [h[1] for h in mine],
                                    [h[2] for h in mine],
                                    ["x"] * len(mine),
                                    [None] * len(mine),
                                ],
                            ).fetchall()
                            held = [h for h in held if h not in mine]
                        conn.execute("select pg_sleep(0.005)")  # the claim's locks held a while
                    held += [(r["job_table"], str(r["id"]), r["claim_token"]) for r in rows]
                    check(conn)
                    if held and rnd.random() < 0.5:  # end one job outside a claim
                        t, jid, token = held.pop(rnd.randrange(len(held)))
                        conn.execute(
                            "select * from complete_jobs(%s, %s, %s, %s, %s)",
                            [t, [jid], [token], ["x"], [None]],
                        )
                # Give back what is still held (ended as done).
                for t, jid, token in held:
                    conn.execute(
                        "select * from complete_jobs(%s, %s, %s, %s, %s)",
                        [t, [jid], [token], ["x"], [None]],
                    )
        except BaseException as exc:
            errors_seen.append(exc)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(8)]
    threads.append(threading.Thread(target=monitor))
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = c.execute(
                "select (select count(*) from ai_course_jobs where status = 'done')"
                " + (select count(*) from ai_media_jobs where status = 'done') as n"
            ).fetchone()
            if row["n"] >= total - 8 * 2 or errors_seen:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors_seen, errors_seen[:3]
    assert not violations, violations[:5]
    assert max(peak.values()) == cap  # the cap was reached, and held
    left = c.execute(
        "select count(*) as n from (select status from ai_course_jobs union all"
        " select status from ai_media_jobs) s where status = 'processing'"
    ).fetchone()["n"]
    assert left == 0


# -- the worker ---------------------------------------------------------------------


async def test_a_capped_job_of_the_other_table_starts_when_the_users_job_ends(
    db_url: str,
) -> None:
    """A's course job runs; A's media job, capped, waits; when the course job
    ends, the worker looks at both tables and starts the media job (no sweep)."""
    release = asyncio.Event()
    media_started = asyncio.Event()

    async def course(j: Job) -> Outcome:
        await release.wait()
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    async def media(j: Job) -> Outcome:
        media_started.set()
        return Outcome(f"media/{j.id}.png", {"provider": "test"})

    with connect(db_url) as c:
        c.execute("update ai_job_settings set max_running_per_user = 1")
    s = settings(db_url, sweep_interval_seconds=3600)
    async with running_worker(s, {"ai_course_jobs": course, "ai_media_jobs": media}) as w:
        await await_until(lambda: _true(w.sweeps >= 1), what="the start-up sweep")
        assert w.producer.capped
        with connect(db_url) as c:
            first = insert_course(c, "First", created_by=A)
        await await_until(
            lambda: _true(_status(db_url, first) == "processing"), what="the course job runs"
        )
        with connect(db_url) as c:
            waiting = insert_media(c, "a cat", created_by=A)
        await await_until(lambda: _true(w.settled), what="the worker settled")
        assert _status(db_url, waiting, "ai_media_jobs") == "pending"
        assert not media_started.is_set()
        release.set()
        await asyncio.wait_for(media_started.wait(), 5)
        await await_until(
            lambda: _true(_status(db_url, waiting, "ai_media_jobs") == "done"), what="done"
        )
        with connect(db_url) as c:
            f, m = job(c, first), job(c, waiting, "ai_media_jobs")
        assert m["started_at"] >= f["completed_at"]


async def _true(value: bool) -> bool | None:
    return True if value else None


def _status(db_url: str, job_id: str, table: str = "ai_course_jobs") -> str:
    with connect(db_url) as c:
        return str(job(c, job_id, table)["status"])
