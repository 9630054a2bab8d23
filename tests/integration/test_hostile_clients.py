"""The attacks a browser can make with the anon key or a signed-in user's JWT, each
tried the way PostgREST would send it (a role and the JWT claims on the session),
on a database prepared like Supabase before `ai-jobs migrate` (tests/supabase.py).

Every case asserts the refusal and that nothing changed; docs/security.md lists
what each role may do."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.helpers import AI_JOBS, connect, env, insert_course, insert_media, job
from tests.supabase import as_anon, as_service, as_user

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
TOKEN = uuid.UUID("00000000-0000-4000-8000-0000000000aa")


@pytest.fixture
def seeded(supabase_db_url: str) -> Iterator[str]:
    """A course of Alice's, done and in the catalog; a job of Bob's; the state an
    attacker would like to change."""
    with connect(supabase_db_url) as c:
        jid = insert_course(c, "Algebra", created_by=ALICE)
        c.execute(
            "update ai_course_jobs set status = 'done', started_at = now(), completed_at = now(),"
            " result_path = 'courses/algebra/course.json', worker_id = 'host:1'  where id = %s",
            [jid],
        )
        c.execute(
            "insert into ai_course_catalog (course_id, job_id, subject, title, result_path)"
            " values ('algebra', %s, 'Algebra', 'Algebra', 'courses/algebra/course.json')",
            [jid],
        )
        insert_media(c, "Bob's cat", created_by=BOB)
    yield supabase_db_url


def snapshot(url: str) -> dict[str, Any]:
    """Everything an attack could change, read as the owner."""
    with connect(url) as c:
        return {
            t: c.execute(f"select * from {t} order by 1").fetchall()
            for t in (
                "ai_course_jobs",
                "ai_media_jobs",
                "ai_job_settings",
                "ai_course_catalog",
                "ai_job_alert_state",
                "ai_jobs_migrations",
                "ai_course_owners",
                "ai_job_provider_state",
                "ai_job_usage_totals",
                "ai_job_charges",
                "ai_job_admissions",
            )
        } | {
            "rejections": c.execute(
                "select last_value, is_called from ai_job_rate_limit_rejections"
            ).fetchone()
        }


ATTACKS = [
    # 1. default grants: tables, the counter, the bookkeeping of others
    *(
        f"truncate {t}"
        for t in (
            "ai_course_jobs",
            "ai_media_jobs",
            "ai_jobs_migrations",
            "ai_job_settings",
            "ai_course_catalog",
            "ai_job_alert_state",
            "ai_job_counter_samples",
            "ai_course_owners",
            "ai_job_provider_state",
            "ai_job_usage_totals",
            "ai_job_charges",
            "ai_job_admissions",
        )
    ),
    "update ai_job_settings set rate_limit_per_hour = 100000",
    "update ai_job_settings set max_subject_length = 100000000",
    "insert into ai_job_settings (singleton) values (false)",
    "update ai_course_catalog set title = 'pwned', result_path = 'courses/evil/course.json'",
    "insert into ai_course_catalog (course_id, job_id, subject, title, result_path)"
    " values ('evil', gen_random_uuid(), 'x', 'x', 'courses/evil/course.json')",
    "delete from ai_course_catalog",
    "select * from ai_course_catalog",
    "select setval('ai_job_rate_limit_rejections', 1)",
    "select nextval('ai_job_rate_limit_rejections')",
    "select last_value from ai_job_rate_limit_rejections",
    "update ai_job_alert_state set firing = true",
    "delete from ai_jobs_migrations",
    "insert into ai_course_owners (course_id, owner) values ('algebra', auth.uid())",
    "update ai_course_owners set owner = auth.uid()",
    "select * from ai_job_metrics",
    "select * from ai_job_counter_samples",
    "update ai_course_jobs set status = 'done'",
    "update ai_course_jobs set created_at = now() - interval '2 hours'",
    "delete from ai_course_jobs",
    "delete from ai_media_jobs",
    # the runbook's and the worker's functions
    "select * from mark_stale_jobs('0 seconds')",
    "select * from move_to_dead_letter()",
    "select * from rescue_stale_jobs(100)",
    "select purge_old_jobs('0 seconds')",
    "select requeue_job(gen_random_uuid(), 'ai_course_jobs')",
    "select * from claim_jobs(null, 'evil', 100)",
    "select * from claim_job('ai_course_jobs', gen_random_uuid(), 'evil')",
    "select * from fail_job('ai_course_jobs', gen_random_uuid(), gen_random_uuid(), 'x')",
    "select * from complete_jobs('ai_course_jobs', '{}', '{}', '{}', '{}')",
    "select * from release_jobs('ai_course_jobs', '{}', '{}')",
    "select * from heartbeat_jobs('ai_course_jobs', '{}', '{}')",
    "select next_job_due()",
    "select ai_job_claim_course_id('algebra', auth.uid(), false)",
    "select ai_job_slugify('x')",
    # sql/014-015: breakers, usage, budgets
    "update ai_job_settings set daily_budget_usd_per_user = null",
    "select ai_job_provider_reset('openai')",
    "select * from ai_job_provider_failed('openai', 'auth', 'x', 1, 3600)",
    "insert into ai_job_provider_state (provider) values ('evil')",
    "select * from defer_job('ai_course_jobs', gen_random_uuid(), gen_random_uuid(), 1, 'x')",
    "select ai_job_add_usage('{openai}', '{m}', '{1}', '{1}', '{0}', '{1}', '{1000}')",
    "select nextval('ai_job_budget_rejections')",
    "select ai_job_user_spend(auth.uid(), now())",
    # sql/021: charges, admissions, course id releases
    "select * from ai_job_charges",
    "delete from ai_job_charges",
    "insert into ai_job_charges (job_table, job_id, provider, model)"
    " values ('ai_course_jobs', gen_random_uuid(), 'openai', 'm')",
    "select ai_job_add_charges('{ai_course_jobs}', array[gen_random_uuid()], '{openai}', '{m}',"
    " '{1}', '{0}', '{1}', '{-5}')",
    "select * from ai_job_admissions",
    "delete from ai_job_admissions",
    "insert into ai_job_admissions (created_by) values (auth.uid())",
    "select ai_job_release_course_ids(array['00000000-0000-4000-8000-00000000a11c'::uuid],"
    " '{algebra}')",
    # sql/024: progress is the worker's to write
    """update ai_course_jobs set progress = '{"percent": 100}'""",
    """update ai_course_jobs set partial_result = '{"title": "pwned"}'""",
    """update ai_media_jobs set progress = '{"percent": 100}'""",
    "update ai_course_jobs set batch = true, trace_parent = null",
    "select * from progress_jobs('ai_course_jobs', array[gen_random_uuid()],"
    """ array[gen_random_uuid()], array['{"percent": 1}'::jsonb])""",
    "select trace_parent from ai_course_jobs",
    "select * from ai_job_read_as_users(array['{}'], array[gen_random_uuid()], array[1])",
]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_client_roles_are_refused_everything_but_their_requests(seeded: str, role: str) -> None:
    before = snapshot(seeded)
    allowed = []
    with connect(seeded) as c:
        if role == "anon":
            as_anon(c)
        else:
            as_user(c, BOB)
        for statement in ATTACKS:
            try:
                c.execute(statement)
            except errors.InsufficientPrivilege:
                continue
            allowed.append(statement)
    assert not allowed, f"{role} may: {allowed}"
    assert snapshot(seeded) == before


def test_anon_can_neither_read_nor_insert_jobs(seeded: str) -> None:
    with connect(seeded) as c:
        as_anon(c)
        for statement in (
            "select id from ai_course_jobs",
            "select id from ai_media_jobs",
            "insert into ai_course_jobs (subject) values ('x')",
            "insert into ai_media_jobs (prompt, media_type) values ('x', 'image')",
            "select check_ai_job_rate_limit(gen_random_uuid())",
            "select rate_limit_per_hour from ai_job_settings",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(statement)


def test_a_user_reads_only_the_public_columns_of_their_own_jobs(seeded: str) -> None:
    with connect(seeded) as c:
        as_user(c, ALICE)
        rows = c.execute("select subject, status, course_id, result_path from ai_course_jobs")
        assert [r["subject"] for r in rows.fetchall()] == ["Algebra"]
        assert c.execute("select id from ai_media_jobs").fetchall() == []  # Bob's
        for column in ("worker_id", "claim_token", "*"):
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(f"select {column} from ai_course_jobs")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("select worker_id from ai_media_jobs")
        # what a client needs: the limits, and whether it may insert
        limits = c.execute(
            "select rate_limit_per_hour, max_subject_length, max_prompt_length, max_params_bytes"
            " from ai_job_settings"
        ).fetchone()
        assert limits == {
            "rate_limit_per_hour": 10,
            "max_subject_length": 500,
            "max_prompt_length": 4000,
            "max_params_bytes": 8192,
        }
        assert c.execute("select check_ai_job_rate_limit(auth.uid()) as ok").fetchone()["ok"]


BOOKKEEPING = {
    "id": "gen_random_uuid()",
    "status": "'done'",
    "retry_count": "2000",
    "max_retries": "100000",
    "error": "'x'",
    "created_at": "now() - interval '2 hours'",
    "run_after": "now() - interval '1 year'",
    "started_at": "'-infinity'",
    "last_heartbeat": "now()",
    "completed_at": "now()",
    "result_path": "'courses/algebra/course.json'",
    "metrics": """'{"generationDurationMs": 1e400}'""",
    "claim_token": "gen_random_uuid()",
    "worker_id": "'evil'",
}


@pytest.mark.parametrize("column", sorted(BOOKKEEPING))
@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
def test_a_user_may_insert_the_request_columns_only(
    supabase_db_url: str, table: str, column: str
) -> None:
    request = (
        "subject, created_by" if table == "ai_course_jobs" else "prompt, media_type, created_by"
    )
    values = "'x', auth.uid()" if table == "ai_course_jobs" else "'x', 'image', auth.uid()"
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        value = BOOKKEEPING[column]
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(f"insert into {table} ({request}, {column}) values ({values}, {value})")
        c.execute(f"insert into {table} ({request}) values ({values})")  # the request alone: fine


def test_whatever_a_client_role_sends_a_job_starts_fresh(supabase_db_url: str) -> None:
    """Should a deployment grant a client every column (a dashboard's "grant all"),
    the database still keeps the bookkeeping: the insert trigger resets it for any
    role but the owner and service_role, and back-dated rows cannot beat the rate
    limit."""
    with connect(supabase_db_url) as c:
        c.execute("grant insert on ai_course_jobs, ai_media_jobs to authenticated")
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        columns = ", ".join(BOOKKEEPING)
        values = ", ".join(
            v if k != "metrics" else """'{"generationDurationMs": 1}'"""
            for k, v in BOOKKEEPING.items()
        ).replace("'-infinity'", "now()")
        row = c.execute(
            f"insert into ai_course_jobs (subject, created_by, {columns})"
            f" values ('Algebra', auth.uid(), {values}) returning id"
        ).fetchone()
        # 30 back-dated jobs in one statement: the limit of 10 still holds
        with pytest.raises(psycopg.Error, match=r"^Rate limit exceeded") as limited:
            c.execute(
                "insert into ai_course_jobs (subject, created_by, created_at)"
                " select 'spam ' || g, auth.uid(), now() - interval '2 hours'"
                " from generate_series(1, 30) g"
            )
        assert limited.value.sqlstate == "AJ429"
    with connect(supabase_db_url) as c:
        fresh = job(c, str(row["id"]))
        assert fresh["status"] == "pending" and fresh["retry_count"] == 0
        assert fresh["max_retries"] == 10  # bounded
        for col in ("error", "started_at", "last_heartbeat", "completed_at", "result_path"):
            assert fresh[col] is None, col
        for col in ("metrics", "claim_token", "worker_id"):
            assert fresh[col] is None, col
        age = c.execute(
            "select now() - created_at as age, run_after - created_at as wait"
            " from ai_course_jobs where id = %s",
            [row["id"]],
        ).fetchone()
        assert age["age"].total_seconds() < 60 and age["wait"].total_seconds() == 0
        n = c.execute("select count(*) from ai_course_jobs where created_by = %s", [ALICE])
        assert n.fetchone()["count"] == 1


def test_the_owner_and_service_role_keep_full_control(supabase_db_url: str) -> None:
    """The worker, `ai-jobs enqueue` and operators write any column they need."""
    for act_as in (None, as_service):
        with connect(supabase_db_url) as c:
            if act_as:
                act_as(c)
            jid = insert_course(
                c,
                "Operator's",
                status="failed",
                retry_count=2,
                max_retries=5,
                error="earlier",
                created_by=BOB,
            )
            c.execute("update ai_course_jobs set run_after = now() + interval '1 hour'")
            row = c.execute(
                "select status, retry_count, max_retries, error from ai_course_jobs where id = %s",
                [jid],
            ).fetchone()
            assert row == {
                "status": "failed",
                "retry_count": 2,
                "max_retries": 5,
                "error": "earlier",
            }
            assert c.execute("select * from mark_stale_jobs()").fetchall() == []
            c.execute("select requeue_job(%s, 'ai_course_jobs')", [jid])


# -- 3. values that broke the worker or the operators' tools ---------------------

POISON = [
    ("started_at", "'-infinity'"),
    ("completed_at", "'infinity'"),
    ("run_after", "'infinity'"),
    ("created_at", "'-infinity'"),
    ("last_heartbeat", "'99999-01-01'"),
    ("retry_count", "2000"),
    ("max_retries", "1000"),
    ("metrics", """'{"generationDurationMs": 1e400, "provider": "openai"}'"""),
    ("metrics", """'{"nested": {"deep": [-1e301]}}'"""),
    ("metrics", "'[1, 2]'"),
    # sql/024: a trace_parent that is not W3C's (upper case, a newline, zero ids, v ff)
    ("trace_parent", "'00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01'"),
    ("trace_parent", "E'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\\n'"),
    ("trace_parent", "'00-00000000000000000000000000000000-b7ad6b7169203331-01'"),
    ("trace_parent", "'00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01'"),
    ("trace_parent", "'ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'"),
    ("trace_parent", "'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra'"),
]


@pytest.mark.parametrize(("column", "value"), POISON)
@pytest.mark.parametrize("who", ["owner", "service_role"])
def test_no_role_can_write_a_value_the_worker_cannot_compute_with(
    supabase_db_url: str, who: str, column: str, value: str
) -> None:
    with connect(supabase_db_url) as c:
        if who == "service_role":
            as_service(c)
        with pytest.raises(errors.CheckViolation):
            c.execute(
                f"insert into ai_course_jobs (subject, status, {column})"
                f" values ('x', 'done', {value})"
            )
        jid = insert_course(c, "y")
        with pytest.raises(errors.CheckViolation):
            c.execute(f"update ai_course_jobs set {column} = {value} where id = %s", [jid])


def _processing(c: psycopg.Connection[Any], **cols: Any) -> str:
    jid = insert_course(c, "Failing", **cols)
    c.execute(
        "update ai_course_jobs set status = 'processing', claim_token = %s, started_at = now()"
        " where id = %s",
        [TOKEN, jid],
    )
    return jid


FAIL = "select * from fail_job('ai_course_jobs', %s, %s, 'boom', %s)"


@pytest.mark.parametrize("base", [10.0, 1e308, float("inf"), float("nan"), -5.0])
def test_fail_job_cannot_overflow(supabase_db_url: str, base: float) -> None:
    with connect(supabase_db_url) as c:
        jid = _processing(c, retry_count=999, max_retries=100)
        (row,) = c.execute(FAIL, [jid, TOKEN, base]).fetchall()
        assert row["status"] == "dead_letter" and row["retry_count"] == 1000
        jid = _processing(c, retry_count=60, max_retries=100)
        (row,) = c.execute(FAIL, [jid, TOKEN, base]).fetchall()
        assert row["status"] == "failed" and row["retry_count"] == 61
        wait = c.execute(
            "select extract(epoch from run_after - now())::float8 as s from ai_course_jobs"
            " where id = %s",
            [jid],
        ).fetchone()["s"]
        assert wait <= 86400 + 5  # bounded: at most a day


def test_a_failure_that_cannot_be_written_still_ends_the_job(supabase_db_url: str) -> None:
    """Whatever breaks the usual failure write (here a planted trigger), the job
    goes to the dead letter with both errors, instead of staying processing to be
    rescued when stale and run again, calling the paid provider each time."""
    with connect(supabase_db_url) as c:
        c.execute(
            "create function planted_fault() returns trigger language plpgsql as"
            " $$ begin if new.status = 'failed' then raise exception 'disk on fire'; end if;"
            " return new; end $$"
        )
        c.execute(
            "create trigger planted_fault before update on ai_course_jobs"
            " for each row execute function planted_fault()"
        )
        jid = _processing(c)
        (row,) = c.execute(FAIL, [jid, TOKEN, 10.0]).fetchall()
        assert row["status"] == "dead_letter"
        final = job(c, jid)
        assert final["error"] == "Failure could not be recorded (disk on fire): boom"
        assert final["completed_at"] is not None and final["claim_token"] is None
        # a token that no longer matches still changes nothing
        assert c.execute(FAIL, [jid, TOKEN, 10.0]).fetchall() == []


def test_rescue_of_a_stale_job_at_the_bounds(supabase_db_url: str) -> None:
    with connect(supabase_db_url) as c:
        jid = insert_course(c, "Lost", retry_count=1000, max_retries=100, status="stale")
        rows = c.execute("select * from rescue_stale_jobs(10)").fetchall()
        assert [(str(r["job_id"]), r["status"]) for r in rows] == [(jid, "dead_letter")]
        assert job(c, jid)["retry_count"] == 1000


# -- 5. courses have owners ------------------------------------------------------


def _course_id(c: psycopg.Connection[Any], subject: str, **cols: Any) -> str:
    names = ", ".join(["subject", "created_by", *cols])
    marks = ", ".join(["%s", "auth.uid()", *(["%s"] * len(cols))])
    row = c.execute(
        f"insert into ai_course_jobs ({names}) values ({marks}) returning course_id",
        [subject, *cols.values()],
    ).fetchone()
    return str(row["course_id"])


def test_nobody_takes_over_a_course_another_user_made(supabase_db_url: str) -> None:
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        assert _course_id(alice, "Algebra") == "algebra"
        # the same subject: Bob's own course, under a suffix that stays his
        bobs = _course_id(bob, "Algebra")
        assert re.fullmatch(r"algebra-[0-9a-f]{10}", bobs), bobs
        assert _course_id(bob, "  ALGEBRA! ") == bobs
        # naming Alice's course outright is refused, whatever the spelling tricks
        for given in (
            "algebra",
            "ALGEBRA",
            "Algebra",
            "algebra\n",
            "algebra/../algebra",
            " algebra",
        ):
            with pytest.raises((errors.InsufficientPrivilege, errors.CheckViolation)):
                _course_id(bob, "Anything", course_id=given)
        # each regenerates their own
        assert _course_id(alice, "algebra") == "algebra"
        assert _course_id(bob, "Algebra", course_id=bobs) == bobs
        # a course id given and free is the giver's from then on
        assert _course_id(bob, "Sailing", course_id="sailing-101") == "sailing-101"
        with pytest.raises(errors.InsufficientPrivilege):
            _course_id(alice, "Sailing", course_id="sailing-101")
        assert _course_id(alice, "Sailing 101") != "sailing-101"
    with connect(supabase_db_url) as c:
        # system jobs (no user) are an owner of their own
        assert job(c, insert_course(c, "Algebra"))["course_id"] not in ("algebra", bobs)
        owners = c.execute("select course_id, owner from ai_course_owners order by 1").fetchall()
        assert {r["course_id"]: r["owner"] for r in owners}["algebra"] == ALICE


def test_two_users_asking_for_one_course_id_at_once(supabase_db_url: str) -> None:
    """The claim is a primary key: one of them gets the id, the other a suffix."""
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        alice.execute("begin")
        first = _course_id(alice, "Geology")
        bob.execute("set statement_timeout = '200ms'")  # Bob waits on Alice's claim ...
        with pytest.raises(errors.QueryCanceled):
            _course_id(bob, "Geology")
        alice.execute("commit")
        bob.execute("set statement_timeout = 0")
        second = _course_id(bob, "Geology")  # ... and gets his own once it is decided
    assert first == "geology" and second.startswith("geology-")


# -- 6. the smaller items ----------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "column", "size"),
    [
        ("ai_course_jobs", "subject", 501),
        ("ai_media_jobs", "prompt", 4001),
        ("ai_course_jobs", "subject", 1_000_000),
    ],
)
def test_request_lengths_are_capped_for_every_role(
    supabase_db_url: str, table: str, column: str, size: int
) -> None:
    other = ", media_type" if table == "ai_media_jobs" else ""
    other_value = ", 'image'" if table == "ai_media_jobs" else ""
    for act_as in (as_user, None):
        with connect(supabase_db_url) as c:
            if act_as:
                act_as(c, ALICE)
            with pytest.raises(errors.CheckViolation, match=f"^{column} is {size} characters"):
                c.execute(
                    f"insert into {table} ({column}, created_by{other})"
                    f" values (%s, %s{other_value})",
                    ["x" * size, ALICE],
                )
            c.execute(
                f"insert into {table} ({column}, created_by{other}) values (%s, %s{other_value})",
                ["x" * 400, ALICE],
            )


def test_params_are_capped_in_size_and_depth(supabase_db_url: str) -> None:
    deep: Any = 1
    for _ in range(21):
        deep = [deep]
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        for params, message in (
            ({"instructions": "x" * 9000}, r"^params are \d+ bytes long, over the limit of 8192"),
            ({"a": deep}, "^params are nested more than 20 levels deep"),
            ("[" * 3000 + "]" * 3000, None),  # not even an object
        ):
            with pytest.raises((errors.CheckViolation, errors.ProgramLimitExceeded)) as exc:
                c.execute(
                    "insert into ai_course_jobs (subject, params, created_by)"
                    " values ('x', %s, auth.uid())",
                    [params if isinstance(params, str) else json.dumps(params)],
                )
            if message:
                assert re.match(message, str(exc.value.diag.message_primary))
        c.execute(
            "insert into ai_course_jobs (subject, params, created_by) values ('x', %s, auth.uid())",
            [json.dumps({"a": deep[0][0]})],  # 20 levels: fine
        )


def test_limits_change_from_psql_and_from_the_settings(supabase_db_url: str) -> None:
    from listener.migrate import migrate
    from listener.settings import Settings

    with connect(supabase_db_url) as c:
        c.execute("update ai_job_settings set max_subject_length = 5")
        with pytest.raises(errors.CheckViolation):
            insert_course(c, "123456")
        insert_course(c, "12345")
    limits = Settings(max_subject_length=7, max_prompt_length=8, max_params_bytes=20)
    # every deploy's migrate leaves a limit changed live alone ...
    asyncio.run(migrate(supabase_db_url, request_limits=limits.request_limits()))
    with connect(supabase_db_url) as c:
        assert c.execute("select max_subject_length from ai_job_settings").fetchone() == {
            "max_subject_length": 5
        }
    # ... unless asked to write the settings
    asyncio.run(
        migrate(supabase_db_url, request_limits=limits.request_limits(), write_settings=True)
    )
    with connect(supabase_db_url) as c:
        row = c.execute(
            "select max_subject_length, max_prompt_length, max_params_bytes from ai_job_settings"
        ).fetchone()
        assert row == {"max_subject_length": 7, "max_prompt_length": 8, "max_params_bytes": 20}


def test_the_first_migrate_writes_the_request_limits(empty_db_url: str) -> None:
    """Like the rate limit: written from the settings when the columns appear (the
    first install, or migration 011 on an older database), left alone later."""
    p = subprocess.run(
        [*AI_JOBS, "migrate"],
        env=env(empty_db_url, MAX_SUBJECT_LENGTH="42", MAX_PARAMS_BYTES="1000"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    with connect(empty_db_url) as c:
        row = c.execute(
            "select max_subject_length, max_prompt_length, max_params_bytes from ai_job_settings"
        ).fetchone()
    assert row == {"max_subject_length": 42, "max_prompt_length": 4000, "max_params_bytes": 1000}


# -- round two: course ids anyone can ask for, temp tables, who is asking ----------


def _cancel(c: psycopg.Connection[Any], job_id: str, table: str = "ai_course_jobs") -> None:
    c.execute("select cancel_job(%s, %s)", [job_id, table])


def _insert_returning(c: psycopg.Connection[Any], subject: str) -> tuple[str, str]:
    row = c.execute(
        "insert into ai_course_jobs (subject, created_by) values (%s, auth.uid())"
        " returning id, course_id",
        [subject],
    ).fetchone()
    return str(row["id"]), str(row["course_id"])


def test_a_user_can_always_ask_for_any_subject(supabase_db_url: str) -> None:
    """Knowing Alice's uuid, Bob takes the subject's slug and every fallback id the
    old scheme (slug + 6 hex of md5(owner/slug/attempt), 7 tries) would give her,
    within the rate limit. Her request must still get an id of her own, and the
    same one when she asks again."""
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        assert _course_id(bob, "Chemistry") == "chemistry"
        for attempt in range(1, 8):
            digest = hashlib.md5(f"{ALICE}/chemistry/{attempt}".encode()).hexdigest()
            _course_id(bob, "Squatted", course_id=f"chemistry-{digest[:6]}")
        hers = _course_id(alice, "Chemistry")
        assert re.fullmatch(r"chemistry-[0-9a-f]{10}", hers), hers
        assert _course_id(alice, "chemistry!") == hers  # regenerating her own course works
        # the fallback is not a function of (owner, slug): Carol's is another one
        with connect(supabase_db_url) as carol:
            as_user(carol, uuid.UUID("00000000-0000-4000-8000-0000000ca201"))
            assert _course_id(carol, "Chemistry") not in (hers, "chemistry")


def test_a_cancelled_job_gives_its_course_id_back(supabase_db_url: str) -> None:
    """A job inserted and cancelled at once used to hold a popular slug for good."""
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        first, slug = _insert_returning(bob, "Physics")
        second, again = _insert_returning(bob, "Physics")
        assert slug == again == "physics"
        _cancel(bob, first)
        # Bob's other job still names it: still his
        assert _course_id(alice, "Physics") != "physics"
        _cancel(bob, second)
        assert _course_id(alice, "Physics") == "physics"  # free again, and now hers
        # a course of Alice's that was made (in the catalog) stays hers after a cancel
        made, course = _insert_returning(alice, "Botany")
    with connect(supabase_db_url) as c:
        c.execute(
            "insert into ai_course_catalog (course_id, job_id, subject, title, result_path)"
            " values (%s, %s, 'Botany', 'Botany', 'courses/botany/course.json')",
            [course, made],
        )
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        _cancel(alice, made)
        assert _course_id(bob, "Botany") != "botany"


def test_purged_jobs_give_their_course_ids_back(supabase_db_url: str) -> None:
    with connect(supabase_db_url) as c:
        as_user(c, BOB)
        failed, _ = _insert_returning(c, "Geology")
        done, kept = _insert_returning(c, "Zoology")
    with connect(supabase_db_url) as c:
        c.execute(
            "update ai_course_jobs set status = 'dead_letter', completed_at = now() - interval"
            " '100 days' where id = %s",
            [failed],
        )
        c.execute(
            "update ai_course_jobs set status = 'done', completed_at = now() - interval"
            " '100 days' where id = %s",
            [done],
        )
        c.execute(
            "insert into ai_course_catalog (course_id, job_id, subject, title, result_path)"
            " values (%s, %s, 'Zoology', 'Zoology', 'courses/zoology/course.json')",
            [kept, done],
        )
        assert c.execute("select purge_old_jobs('90 days') as n").fetchone() == {"n": 2}
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        assert _course_id(c, "Geology") == "geology"  # no course was made: free again
        assert _course_id(c, "Zoology") != "zoology"  # Bob's course is still his


def test_a_media_job_names_only_a_course_of_its_owner(supabase_db_url: str) -> None:
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        assert _course_id(alice, "Algebra") == "algebra"
        assert _course_id(bob, "Sailing") == "sailing"
        media = (
            "insert into ai_media_jobs (prompt, media_type, created_by, course_id)"
            " values ('a picture', 'image', auth.uid(), %s) returning course_id"
        )
        for given in ("algebra", "ALGEBRA", "nobodys-course"):
            with pytest.raises(errors.InsufficientPrivilege, match="not a course of yours"):
                bob.execute(media, [given])
        assert bob.execute(media, ["sailing"]).fetchone() == {"course_id": "sailing"}
        assert alice.execute(media, ["Algebra"]).fetchone() == {"course_id": "Algebra"}


SETTINGS_COLUMNS = (
    "singleton boolean, rate_limit_per_hour int, max_subject_length int,"
    " max_prompt_length int, max_params_bytes int, daily_budget_usd_per_user numeric,"
    " budget_estimate_usd_per_job numeric"
)


@pytest.mark.parametrize("search_path", [None, "pg_temp, public", "public, pg_temp"])
def test_a_temp_table_cannot_stand_in_for_the_settings(
    supabase_db_url: str, search_path: str | None
) -> None:
    """A direct SQL session of `authenticated` makes its own ai_job_settings with
    huge limits: the admission trigger must read ours."""
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        c.execute(f"create temp table ai_job_settings ({SETTINGS_COLUMNS})")
        c.execute("insert into ai_job_settings values (true, 1000000, 1000000, 1000000, 10000000)")
        if search_path:
            c.execute(f"set search_path = {search_path}")
        with pytest.raises(errors.CheckViolation, match="over the limit of 500"):
            c.execute(
                "insert into public.ai_course_jobs (subject, created_by) values (%s, auth.uid())",
                ["x" * 200_000],
            )


def test_a_temp_pg_class_does_not_make_a_user_trusted(supabase_db_url: str) -> None:
    """Should a deployment grant a client every column, the admission trigger still
    resets the bookkeeping: its "is this the owner?" must read the real pg_class."""
    with connect(supabase_db_url) as c:
        c.execute("grant insert on ai_course_jobs to authenticated")
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        c.execute("create temp table pg_class (oid oid, relowner oid)")
        c.execute(
            "insert into pg_temp.pg_class select 'public.ai_course_jobs'::regclass, r.oid"
            " from pg_catalog.pg_roles r where r.rolname = 'authenticated'"
        )
        c.execute("create temp table pg_auth_members (roleid oid, member oid)")
        row = c.execute(
            "insert into ai_course_jobs (subject, created_by, status, result_path, error)"
            " values ('Trusted?', auth.uid(), 'done', 'courses/evil/course.json', 'x')"
            " returning id"
        ).fetchone()
    with connect(supabase_db_url) as c:
        fresh = job(c, str(row["id"]))
        assert (fresh["status"], fresh["result_path"], fresh["error"]) == ("pending", None, None)


def _counters(c: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return tuple(
        c.execute(f"select last_value, is_called from {s}").fetchone()
        for s in ("ai_job_rate_limit_rejections", "ai_job_budget_rejections")
    )


@pytest.mark.parametrize("table", ["ai_course_jobs", "ai_media_jobs"])
def test_an_insert_for_another_user_reveals_nothing_and_counts_nothing(
    supabase_db_url: str, table: str
) -> None:
    """Alice is over her rate limit and her budget and owns "algebra". Bob's insert
    in her name must fail as row-level security fails, before any of her counts,
    her spend or her courses are looked at, and page nobody."""
    with connect(supabase_db_url) as c:
        insert_course(c, "Algebra", created_by=ALICE)
        insert_course(c, "Biology", created_by=ALICE)
        insert_media(c, "a cat", created_by=ALICE)
        insert_media(c, "a dog", created_by=ALICE)
        c.execute(
            "update ai_job_settings set daily_budget_usd_per_user = 0.05,"
            " budget_estimate_usd_per_job = 0.04, rate_limit_per_hour = 2"
        )
        before = _counters(c)
    statement = (
        "insert into ai_course_jobs (subject, created_by) values ('Algebra', %s)"
        if table == "ai_course_jobs"
        else "insert into ai_media_jobs (prompt, media_type, created_by, course_id)"
        " values ('x', 'image', %s, 'algebra')"
    )
    with connect(supabase_db_url) as c:
        as_user(c, BOB)
        with pytest.raises(errors.InsufficientPrivilege) as refused:
            c.execute(statement, [ALICE])
    assert str(refused.value.diag.message_primary) == (
        f'new row violates row-level security policy for table "{table}"'
    )
    assert refused.value.diag.message_detail is None and refused.value.diag.message_hint is None
    with connect(supabase_db_url) as c:
        assert _counters(c) == before


@pytest.mark.parametrize("requeue", ["requeue_job", "requeue_jobs"])
def test_a_requeued_job_never_writes_into_a_course_taken_since(
    supabase_db_url: str, requeue: str
) -> None:
    """Bob's cancel gave "physics" back and Alice took it; an operator then
    requeues Bob's job: it runs under an id of Bob's own, not in Alice's course."""
    with connect(supabase_db_url) as alice, connect(supabase_db_url) as bob:
        as_user(alice, ALICE)
        as_user(bob, BOB)
        bobs, course = _insert_returning(bob, "Physics")
        _cancel(bob, bobs)
        assert _course_id(alice, "Physics") == course == "physics"
        kept, given = _insert_returning(bob, "Sailing")
        _cancel(bob, kept)  # given back, and still free: his again when requeued
    with connect(supabase_db_url) as c:
        as_service(c)
        if requeue == "requeue_job":
            c.execute("select requeue_job(%s, 'ai_course_jobs')", [bobs])
            c.execute("select requeue_job(%s, 'ai_course_jobs')", [kept])
        else:
            n = c.execute("select requeue_jobs(status => 'cancelled') as n").fetchone()["n"]
            assert n == 2
    with connect(supabase_db_url) as c:
        moved = job(c, bobs)
        assert moved["status"] == "pending"
        assert re.fullmatch(r"physics-[0-9a-f]{10}", moved["course_id"]), moved["course_id"]
        assert job(c, kept)["course_id"] == given == "sailing"
        owners = c.execute("select course_id, owner from ai_course_owners").fetchall()
        mine = {r["course_id"]: r["owner"] for r in owners}
        assert (mine["physics"], mine[moved["course_id"]], mine["sailing"]) == (ALICE, BOB, BOB)


# -- sql/024: progress, partial results, batch, trace_parent ---------------------

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("ai_course_jobs", "progress"),
        ("ai_course_jobs", "partial_result"),
        ("ai_media_jobs", "progress"),
    ],
)
def test_a_user_cannot_write_progress(supabase_db_url: str, table: str, column: str) -> None:
    request = (
        "subject, created_by" if table == "ai_course_jobs" else "prompt, media_type, created_by"
    )
    values = "'x', auth.uid()" if table == "ai_course_jobs" else "'x', 'image', auth.uid()"
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(
                f"insert into {table} ({request}, {column})"
                f""" values ({values}, '{{"percent": 100}}')"""
            )
        row = c.execute(
            f"insert into {table} ({request}) values ({values}) returning id"
        ).fetchone()
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(
                f"""update {table} set {column} = '{{"percent": 100}}' where id = %s""",
                [row["id"]],
            )
    with connect(supabase_db_url) as c:
        assert job(c, str(row["id"]), table)[column] is None


def test_a_user_asks_for_batch_and_a_trace_and_watches_their_job(seeded: str) -> None:
    with connect(seeded) as c:
        as_user(c, ALICE)
        course = c.execute(
            "insert into ai_course_jobs (subject, created_by, batch, trace_parent)"
            " values ('Geometry', auth.uid(), true, %s) returning id, batch, progress,"
            " partial_result",
            [TRACE],
        ).fetchone()
        assert course["batch"] is True
        assert course["progress"] is None and course["partial_result"] is None
        media = c.execute(
            "insert into ai_media_jobs (prompt, media_type, created_by, trace_parent)"
            " values ('a cat', 'image', auth.uid(), %s) returning id, batch, progress",
            [TRACE],
        ).fetchone()
        assert media["batch"] is False and media["progress"] is None
        # the trace is handed over, not read back
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("select trace_parent from ai_media_jobs")
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute(
                "insert into ai_course_jobs (subject, created_by, trace_parent)"
                " values ('x', auth.uid(), 'not a traceparent')"
            )
    with connect(seeded) as c:  # the worker writes progress
        c.execute(
            "update ai_course_jobs set status = 'processing', claim_token = %s where id = %s",
            [TOKEN, course["id"]],
        )
        written = c.execute(
            "select * from progress_jobs('ai_course_jobs', %s, %s, %s::jsonb[], %s::jsonb[])",
            [
                [course["id"]],
                [TOKEN],
                ['{"percent": 40, "phase": "generating", "groupsDone": 2, "groupsTotal": 5}'],
                ['{"title": "Geometry", "groups": []}'],
            ],
        ).fetchall()
        assert len(written) == 1
        assert job(c, str(course["id"]))["trace_parent"] == TRACE
    with connect(seeded) as c:  # Alice sees it; Bob sees nothing of it
        as_user(c, ALICE)
        row = c.execute(
            "select progress, partial_result, batch from ai_course_jobs where id = %s",
            [course["id"]],
        ).fetchone()
        assert row["progress"]["percent"] == 40 and row["progress"]["groupsDone"] == 2
        assert row["partial_result"] == {"title": "Geometry", "groups": []}
        as_user(c, BOB)
        assert c.execute("select progress from ai_course_jobs").fetchall() == []


def test_a_client_granted_every_column_still_writes_no_progress(supabase_db_url: str) -> None:
    """A deployment that grants more (a dashboard's "grant all"): progress and the
    partial result still start null, whatever the insert says."""
    with connect(supabase_db_url) as c:
        c.execute("grant insert on ai_course_jobs, ai_media_jobs to authenticated")
    with connect(supabase_db_url) as c:
        as_user(c, ALICE)
        row = c.execute(
            "insert into ai_course_jobs (subject, created_by, status, progress, partial_result)"
            """ values ('x', auth.uid(), 'done', '{"percent": 100}', '{"title": "x"}')"""
            " returning id"
        ).fetchone()
        media = c.execute(
            "insert into ai_media_jobs (prompt, media_type, created_by, progress)"
            """ values ('x', 'image', auth.uid(), '{"percent": 100}') returning id"""
        ).fetchone()
    with connect(supabase_db_url) as c:
        fresh = job(c, str(row["id"]))
        assert fresh["status"] == "pending"
        assert fresh["progress"] is None and fresh["partial_result"] is None
        assert job(c, str(media["id"]), "ai_media_jobs")["progress"] is None


PROGRESS_POISON = [
    "'[1, 2]'",
    """'{"percent": "50"}'""",
    """'{"percent": null}'""",
    """'{"phase": "pwned"}'""",
    """'{"phase": 1}'""",
]


@pytest.mark.parametrize("value", PROGRESS_POISON)
@pytest.mark.parametrize("who", ["owner", "service_role"])
def test_no_role_can_write_a_progress_a_client_cannot_read(
    supabase_db_url: str, who: str, value: str
) -> None:
    with connect(supabase_db_url) as c:
        if who == "service_role":
            as_service(c)
        jid = _processing(c)
        with pytest.raises(errors.CheckViolation):
            c.execute(f"update ai_course_jobs set progress = {value} where id = %s", [jid])
        with pytest.raises(errors.CheckViolation):
            c.execute("update ai_course_jobs set partial_result = '[1]' where id = %s", [jid])
