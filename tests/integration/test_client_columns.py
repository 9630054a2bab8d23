"""sql/024: the progress rules, held by the database for every writer, and
progress_jobs, the worker's one statement for many jobs' progress."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.helpers import connect, insert_course, insert_media, job

PROGRESS = "select * from progress_jobs(%s, %s, %s, %s::jsonb[], %s::jsonb[])"


def claim(c: psycopg.Connection[Any], table: str = "ai_course_jobs", n: int = 1) -> list[Any]:
    return c.execute("select * from claim_jobs(%s, 'w', %s)", [table, n]).fetchall()


def write(
    c: psycopg.Connection[Any],
    rows: list[Any],
    progress: list[dict[str, Any] | None],
    partial: list[dict[str, Any] | None] | None = None,
    table: str = "ai_course_jobs",
) -> list[str]:
    written = c.execute(
        PROGRESS,
        [
            table,
            [r["id"] for r in rows],
            [r["claim_token"] for r in rows],
            [None if p is None else json.dumps(p) for p in progress],
            None if partial is None else [None if p is None else json.dumps(p) for p in partial],
        ],
    ).fetchall()
    return sorted(str(r["progress_jobs"]) for r in written)


def progress(c: psycopg.Connection[Any], job_id: Any, table: str = "ai_course_jobs") -> Any:
    return job(c, str(job_id), table)["progress"]


def test_percent_never_goes_down_within_an_attempt(db_url: str) -> None:
    with connect(db_url) as c:
        insert_course(c)
        (r,) = claim(c)
        assert progress(c, r["id"]) is None  # null until the worker writes
        write(c, [r], [{"percent": 40.4, "phase": "generating", "tokensOut": 120}])
        p = progress(c, r["id"])
        assert p["percent"] == 40 and p["phase"] == "generating" and p["tokensOut"] == 120
        assert p["updatedAt"]  # the database's clock
        write(c, [r], [{"percent": 10, "phase": "generating", "tokensOut": 150}])
        p = progress(c, r["id"])
        assert p["percent"] == 40 and p["tokensOut"] == 150  # the rest is written
        write(c, [r], [{"phase": "storing"}])  # no percent: the one written stays
        assert progress(c, r["id"])["percent"] == 40
        write(c, [r], [{"percent": 250}])
        assert progress(c, r["id"])["percent"] == 100
        # any writer, not only progress_jobs
        c.execute(
            """update ai_course_jobs set progress = '{"percent": 3}' where id = %s""", [r["id"]]
        )
        assert progress(c, r["id"])["percent"] == 100


def test_a_new_attempt_starts_from_nothing(db_url: str) -> None:
    with connect(db_url) as c:
        insert_course(c)
        (r,) = claim(c)
        write(c, [r], [{"percent": 80}], [{"title": "Algebra", "groups": [{"n": 1}]}])
        c.execute(
            "select * from fail_job('ai_course_jobs', %s, %s, 'boom', 0)",
            [r["id"], r["claim_token"]],
        )
        failed = job(c, str(r["id"]))
        assert failed["status"] == "failed"  # the failed attempt's progress is still shown
        assert failed["progress"]["percent"] == 80 and failed["partial_result"] is not None
        (again,) = claim(c)
        assert again["id"] == r["id"]
        fresh = job(c, str(r["id"]))
        assert fresh["progress"] is None and fresh["partial_result"] is None
        write(c, [again], [{"percent": 5}])
        assert progress(c, r["id"])["percent"] == 5


@pytest.mark.parametrize("how", ["complete_jobs", "complete_and_claim", "update"])
def test_done_shows_100_and_no_partial_result(db_url: str, how: str) -> None:
    with connect(db_url) as c:
        insert_course(c)
        (r,) = claim(c)
        write(c, [r], [{"percent": 60, "phase": "generating"}], [{"title": "A", "groups": []}])
        args = [[r["id"]], [r["claim_token"]], ["courses/a/course.json"], ["{}"]]
        if how == "complete_jobs":
            c.execute(
                "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])", args
            )
        elif how == "complete_and_claim":
            c.execute(
                "select * from complete_and_claim('ai_course_jobs', 'w', 0, %s, %s, %s,"
                " %s::jsonb[])",
                args,
            )
        else:
            c.execute("update ai_course_jobs set status = 'done' where id = %s", [r["id"]])
        done = job(c, str(r["id"]))
        assert done["status"] == "done"
        assert done["progress"]["percent"] == 100 and done["progress"]["phase"] == "generating"
        assert done["partial_result"] is None
        # and it stays so, whoever writes
        c.execute(
            """update ai_course_jobs set progress = '{"percent": 50}',"""
            """ partial_result = '{"title": "A"}' where id = %s""",
            [r["id"]],
        )
        again = job(c, str(r["id"]))
        assert again["progress"]["percent"] == 100 and again["partial_result"] is None


def test_a_job_that_never_wrote_progress_is_100_at_done(db_url: str) -> None:
    with connect(db_url) as c:
        insert_media(c)
        (r,) = claim(c, "ai_media_jobs")
        c.execute(
            "select * from complete_jobs('ai_media_jobs', %s, %s, %s, %s::jsonb[])",
            [[r["id"]], [r["claim_token"]], ["media/x.png"], ["{}"]],
        )
        assert progress(c, r["id"], "ai_media_jobs") == {"percent": 100}
        # an operator's insert of a finished job too
        jid = insert_course(c, "Imported", status="done")
        assert progress(c, jid) == {"percent": 100}


def test_progress_jobs_writes_only_what_its_tokens_hold(db_url: str) -> None:
    with connect(db_url) as c:
        for s in ("a", "b", "c", "d"):
            insert_course(c, s)
        a, b, cc, d = claim(c, n=4)
        stranger = dict(b, claim_token=a["claim_token"])  # another job's token
        c.execute("select cancel_job(%s, 'ai_course_jobs')", [cc["id"]])
        before = job(c, str(d["id"]))["last_heartbeat"]
        written = write(
            c,
            [a, stranger, cc, d],
            [{"percent": 10}, {"percent": 20}, {"percent": 30}, None],
            [{"title": "A"}, None, None, None],
        )
        assert written == sorted([str(a["id"]), str(d["id"])])
        assert progress(c, a["id"])["percent"] == 10
        assert job(c, str(a["id"]))["partial_result"] == {"title": "A"}
        assert progress(c, b["id"]) is None and progress(c, cc["id"]) is None
        # a null progress keeps what was there and is still a heartbeat
        assert progress(c, d["id"]) is None
        assert job(c, str(d["id"]))["last_heartbeat"] > before
        # a null partial keeps the partial result written before
        write(c, [a], [{"percent": 15}], [None])
        assert job(c, str(a["id"]))["partial_result"] == {"title": "A"}


def test_progress_jobs_on_media_jobs_and_bad_input(db_url: str) -> None:
    with connect(db_url) as c:
        insert_media(c)
        (m,) = claim(c, "ai_media_jobs")
        assert write(c, [m], [{"percent": 50, "phase": "storing"}], table="ai_media_jobs") == [
            str(m["id"])
        ]
        assert progress(c, m["id"], "ai_media_jobs")["phase"] == "storing"
        with pytest.raises(errors.InvalidParameterValue):
            write(c, [m], [{"percent": 50}], table="ai_jobs")
        # a progress the constraint refuses fails the call, with its name
        with pytest.raises(errors.CheckViolation, match="ai_media_jobs_progress_shape"):
            write(c, [m], [{"phase": "uploading"}], table="ai_media_jobs")
        # mismatched arrays: the missing tokens are nulls, which match no job
        assert (
            c.execute(
                PROGRESS, ["ai_media_jobs", [m["id"]], [], ['{"percent": 60}'], None]
            ).fetchall()
            == []
        )


def test_many_users_read_in_one_statement_each_as_themselves(db_url: str) -> None:
    """ai_job_read_as_users (the event streams' read): each reader sees what row-level
    security shows that user, whichever ids are asked for; role and claims are
    undone when it returns."""
    alice, bob = "00000000-0000-4000-8000-00000000a11c", "00000000-0000-4000-8000-000000000b0b"
    with connect(db_url) as c:
        a = insert_course(c, "A", created_by=alice)
        b = insert_media(c, "B", created_by=bob)
        both = [a, b]
        rows = c.execute(
            "select reader, id::text, job_table from ai_job_read_as_users(%s, %s::uuid[], %s)",
            [
                [json.dumps({"sub": alice}), json.dumps({"sub": bob}), json.dumps({})],
                both * 3,
                [1, 1, 2, 2, 3, 3],
            ],
        ).fetchall()
        assert sorted((r["reader"], r["id"], r["job_table"]) for r in rows) == [
            (1, a, "ai_course_jobs"),
            (2, b, "ai_media_jobs"),
        ]
        after = c.execute(
            "select current_user as who, current_setting('request.jwt.claims', true) as claims"
        ).fetchone()
        assert after["who"] != "authenticated" and not after["claims"]
