"""The budget and the rate limit as properties (hypothesis): whatever several
signed-in users do (inserts into either table, some from a transaction that took
its snapshot long before, cancels of their jobs while pending or running) and
whatever the providers charge for each call, under READ COMMITTED and REPEATABLE
READ:

- no user's paid spend passes the daily cap by more than one job's cost (each
  job here costs at most the estimate, as docs/generation.md asks of it), and
  neither does the spend the database reads, reservations included;
- no user has more jobs in a table created within the hour than the rate limit;
- the spend the database reads is never less than what was paid plus what may
  still be paid for the jobs it admitted (up to the estimate for each job that
  may still call a provider, a job cancelled during a call included);
- an insert is refused only by the budget (AJ402), the rate limit (AJ429) or a
  serialization failure (40001, for a transaction whose snapshot missed another
  insert of the same user).

The worker's part is played through its SQL functions (claim_job, each call's
charge as ai_job_add_charges records it, complete_jobs, fail_job), the users'
as direct SQL sessions of `authenticated` (tests/supabase.py). Each example uses
users of its own, on one database per isolation level."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import connect
from tests.supabase import as_user

pytestmark = pytest.mark.timeout(300)

CAP = Decimal("0.05")
ESTIMATE = Decimal("0.03")  # and the most a job costs, all its calls together
LIMIT = 3  # jobs per hour and table
USERS = 2
TABLES = ("ai_course_jobs", "ai_media_jobs")
COSTS = [Decimal("0"), Decimal("0.0025"), Decimal("0.005"), Decimal("0.01"), Decimal("0.02")]
REFUSALS = {"AJ402", "AJ429", "40001"}
CANCELLABLE = ("pending", "failed", "processing")

EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no example database written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

user = st.integers(0, USERS - 1)
pick = st.integers(0, 1000)  # a job, by its place among those inserted so far
inserts = st.tuples(st.just("insert"), user, st.sampled_from(TABLES), st.booleans())
ops = st.lists(
    st.one_of(
        st.tuples(st.just("refresh"), user),
        inserts,
        inserts,  # twice as likely: the limits are reached within an example
        st.tuples(st.just("claim"), pick),
        st.tuples(st.just("call"), pick, st.sampled_from(COSTS)),
        st.tuples(st.just("finish"), pick, st.booleans()),
        st.tuples(st.just("cancel"), pick),
    ),
    min_size=12,  # long enough to reach the limits
    max_size=40,
)


@dataclass
class Job:
    table: str
    id: str
    user: int
    status: str = "pending"
    token: Any = None
    paid: Decimal = Decimal(0)
    in_flight: bool = False  # a provider call of it may still return (and be paid)


@dataclass
class Users:
    """Two direct SQL sessions of `authenticated` per user: `now` inserts in a
    transaction of its own; `old` always holds a transaction whose snapshot was
    taken after its last insert (or a "refresh"), and so misses what happened
    since."""

    now: list[psycopg.Connection[Any]]
    old: list[psycopg.Connection[Any]]
    isolation: str = "read committed"
    ids: list[uuid.UUID] = field(default_factory=list)

    def start(self, isolation: str) -> None:
        self.isolation = isolation
        self.ids = [uuid.uuid4() for _ in range(USERS)]
        for i, u in enumerate(self.ids):
            as_user(self.now[i], u)
            as_user(self.old[i], u)
            self.snapshot(i)

    def snapshot(self, i: int) -> None:
        self.old[i].execute(f"begin isolation level {self.isolation}")
        self.old[i].execute("select count(*) from ai_course_jobs")

    def stop(self) -> None:
        for c in self.old:
            c.execute("rollback")


@pytest.fixture
def sessions(supabase_db_url: str) -> Iterator[tuple[psycopg.Connection[Any], Users]]:
    with connect(supabase_db_url) as worker:
        worker.execute(
            "update ai_job_settings set daily_budget_usd_per_user = %s,"
            " budget_estimate_usd_per_job = %s, rate_limit_per_hour = %s",
            [CAP, ESTIMATE, LIMIT],
        )
        conns = [connect(supabase_db_url) for _ in range(2 * USERS)]
        try:
            yield worker, Users(conns[:USERS], conns[USERS:])
        finally:
            for c in conns:
                c.close()


def insert(c: psycopg.Connection[Any], table: str, isolation: str, opened: bool) -> str | None:
    """The new job's id, or None when refused (by one of REFUSALS only)."""
    sql = (
        # a subject of its own: no two inserts meet on a course id
        "insert into ai_course_jobs (subject, created_by)"
        " values (gen_random_uuid()::text, auth.uid()) returning id"
        if table == "ai_course_jobs"
        else "insert into ai_media_jobs (prompt, media_type, created_by)"
        " values ('p', 'image', auth.uid()) returning id"
    )
    if not opened:
        c.execute(f"begin isolation level {isolation}")
    try:
        row = c.execute(sql).fetchone()
        c.execute("commit")
    except psycopg.Error as exc:
        c.execute("rollback")
        assert exc.sqlstate in REFUSALS, f"{exc.sqlstate}: {exc}"
        return None
    assert row is not None
    return str(row["id"])


def run(worker: psycopg.Connection[Any], users: Users, isolation: str, steps: list[Any]) -> None:
    users.start(isolation)
    try:
        play(worker, users, isolation, steps)
    finally:
        users.stop()


def play(worker: psycopg.Connection[Any], users: Users, isolation: str, steps: list[Any]) -> None:
    jobs: list[Job] = []
    paid = [Decimal(0)] * USERS
    for step in steps:
        kind = step[0]
        job = jobs[step[1] % len(jobs)] if kind not in ("refresh", "insert") and jobs else None
        if kind == "refresh":
            users.old[step[1]].execute("rollback")
            users.snapshot(step[1])
        elif kind == "insert":
            u, table, old = step[1], step[2], step[3]
            new = insert(users.old[u] if old else users.now[u], table, isolation, old)
            if old:
                users.snapshot(u)
            if new is not None:
                jobs.append(Job(table, new, u))
        elif kind == "claim" and job is not None:
            row = worker.execute(
                "select claim_token from claim_job(%s, %s, 'w')", [job.table, job.id]
            ).fetchone()
            if row is not None:
                job.status, job.token, job.in_flight = "processing", row["claim_token"], True
        elif kind == "call" and job is not None and job.in_flight:
            cost = min(step[2], ESTIMATE - job.paid)
            worker.execute(
                "select ai_job_add_charges(array[%s], array[%s::uuid], '{openai}', '{m}',"
                " '{10}', '{0}', '{10}', array[%s::numeric])",
                [job.table, job.id, cost],
            )
            job.paid += cost
            paid[job.user] += cost
            if job.status == "cancelled":
                job.in_flight = False  # the one call under way at the cancel
        elif kind == "finish" and job is not None and job.status == "processing":
            if step[2]:
                worker.execute(
                    "select * from complete_jobs(%s, array[%s::uuid], array[%s::uuid],"
                    " '{x}', array['{}'::jsonb])",
                    [job.table, job.id, job.token],
                )
                job.status = "done"
            else:
                row = worker.execute(
                    "select status from fail_job(%s, %s, %s, 'boom', 0)",
                    [job.table, job.id, job.token],
                ).fetchone()
                assert row is not None
                job.status = row["status"]
            job.in_flight = False
        elif (
            kind == "cancel"
            and job is not None
            and job.status in ("pending", "failed", "processing")
        ):
            users.now[job.user].execute("select cancel_job(%s, %s)", [job.id, job.table])
            job.status = "cancelled"
        check(worker, users, paid, jobs)


def may_still_pay(job: Job) -> Decimal:
    if job.status in ("pending", "processing", "failed") or job.in_flight:
        return ESTIMATE - job.paid
    return Decimal(0)


def check(
    worker: psycopg.Connection[Any], users: Users, paid: list[Decimal], jobs: list[Job]
) -> None:
    for u, who in enumerate(users.ids):
        assert paid[u] <= CAP + ESTIMATE, (
            f"user {u} paid {paid[u]}, over the cap by more than a job"
        )
        spend = worker.execute(
            "select ai_job_user_spend(%s, now() - interval '24 hours') as usd", [who]
        ).fetchone()["usd"]
        owed = paid[u] + sum(may_still_pay(j) for j in jobs if j.user == u)
        assert spend >= owed, f"user {u}: the database reads {spend}, {paid[u]} paid, {owed} owed"
        assert spend < CAP + ESTIMATE, f"user {u}: {spend} spent or reserved, over the cap"
        for table in TABLES:
            n = worker.execute(
                f"select count(*) as n from {table}"
                " where created_by = %s and created_at > now() - interval '1 hour'",
                [who],
            ).fetchone()["n"]
            assert n <= LIMIT, f"user {u}: {n} jobs in {table} within the hour"


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_no_sequence_of_inserts_cancels_and_costs_passes_the_limits(
    sessions: tuple[psycopg.Connection[Any], Users], isolation: str
) -> None:
    worker, users = sessions

    @EXAMPLES
    @given(steps=ops)
    def example(steps: list[Any]) -> None:
        run(worker, users, isolation, steps)

    example()
