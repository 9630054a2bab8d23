"""Property-based fuzzing (hypothesis) against the real worker process: whatever
any role sends on the channel, and whatever a signed-in user inserts, the worker
keeps working, every job ends, nothing another user owns changes, and the
operators' reports answer. Bounded in examples, not in time: a few seconds each."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.notifications import parse_payload
from tests.helpers import AI_JOBS, connect, env, wait_until
from tests.supabase import as_anon, as_user
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(180)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no example database written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=80)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
deep = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
payloads = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=700),
    json_values.map(json.dumps),
    st.builds(
        lambda t, i: json.dumps({"table": t, "id": i}),
        st.sampled_from(["ai_course_jobs", "ai_media_jobs"]) | json_values,
        st.uuids().map(str) | json_values,
    ),
    st.integers(1, 7000).map(lambda n: "[" * n),
    st.integers(1, 2000).map(lambda n: '{"table": ' * n),
    deep,
    st.uuids().map(str),
    st.just(""),
)


def _valid(payload: str) -> bool:
    try:
        parse_payload(payload)
    except Exception:
        return False
    return True


def test_fuzzed_notifications_never_stop_the_worker(supabase_db_url: str) -> None:
    w = WorkerProcess(supabase_db_url).started()
    sent: list[str] = []
    try:
        with connect(supabase_db_url) as anon:
            as_anon(anon)

            @FUZZ
            @given(payloads)
            def send(payload: str) -> None:
                if len(payload.encode()) >= 8000:  # PostgreSQL's own limit
                    return
                anon.execute("select pg_notify('ai_jobs', %s)", [payload])
                sent.append(payload)

            send()
        bad = sum(not _valid(p) for p in sent)
        assert bad > 20  # the fuzzing reached the refusals
        wait_until(lambda: len(w.actions("bad_payload")) >= bad, what="every payload read")
        with connect(supabase_db_url) as c:
            jid = c.execute(
                "insert into ai_media_jobs (prompt, media_type) values ('still here', 'image')"
                " returning id"
            ).fetchone()["id"]
            wait_until(
                lambda: (
                    c.execute("select status from ai_media_jobs where id = %s", [jid]).fetchone()[
                        "status"
                    ]
                    == "done"
                ),
                what="a job after the fuzzing, on its notification",
            )
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert len(w.actions("bad_payload")) == bad
    assert [e for e in w.events() if e["level"] in ("ERROR", "CRITICAL")] == []


USERS = [uuid.UUID(int=i) for i in (0xA11CE, 0xB0B)]
VICTIM = uuid.UUID(int=0xDA7E)
SLUG = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
course_requests = st.fixed_dictionaries(
    {
        "subject": st.one_of(
            text,
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=600),
            st.just("Victim"),
        ),
        "params": st.dictionaries(text, json_values, max_size=6)
        | st.fixed_dictionaries(
            {"itemsPerGroup": st.integers(-5, 60), "level": text | st.just("beginner")}
        )
        | deep.map(lambda d: {"x": json.loads(d) if len(d) < 200 else d}),
        "course_id": st.one_of(
            st.none(), st.just(""), SLUG, text, st.just("victim"), st.just("victim\n")
        ),
    }
)
media_requests = st.fixed_dictionaries(
    {
        "prompt": text,
        "media_type": st.sampled_from(["image", "audio", "video", ""]),
        "params": st.dictionaries(text, json_values, max_size=4)
        | st.fixed_dictionaries(
            {"size": text | st.just("256x256"), "format": st.sampled_from(["mp3", "wav", "exe"])}
        ),
        "course_id": st.one_of(st.none(), SLUG, text),
    }
)
# What the database may answer a request it refuses; anything else is a bug.
REFUSALS = {
    "42501",  # insufficient_privilege: another user's course id, someone else's created_by
    "23514",  # check_violation: a limit, a blank subject, a bad media type or course id
    "54001",  # statement_too_complex: JSON nested past PostgreSQL's own parser
}


def test_fuzzed_requests_of_signed_in_users(supabase_db_url: str) -> None:
    storage = Path(tempfile.mkdtemp())
    with connect(supabase_db_url) as c:
        c.execute("update ai_job_settings set rate_limit_per_hour = 100000")
    w = WorkerProcess(
        supabase_db_url, STORAGE_URL=storage, CACHE_TTL_SECONDS="0", CATALOG_BATCH_JOBS="1"
    ).started()
    refused: dict[str, int] = {}
    try:
        with connect(supabase_db_url) as c:
            as_user(c, VICTIM)
            victim_job = c.execute(
                "insert into ai_course_jobs (subject, created_by) values ('Victim', auth.uid())"
                " returning id"
            ).fetchone()["id"]
        with connect(supabase_db_url) as c:
            wait_until(
                lambda: (
                    c.execute(
                        "select status from ai_course_jobs where id = %s", [victim_job]
                    ).fetchone()["status"]
                    == "done"
                ),
                what="the victim's course",
            )
            victim_catalog = c.execute(
                "select * from ai_course_catalog where course_id = 'victim'"
            ).fetchone()
        victim_file = storage / "courses/victim/course.json"
        victim_before = (victim_file.read_bytes(), victim_file.stat().st_mtime_ns)

        conns = {u: connect(supabase_db_url) for u in USERS}
        for u, conn in conns.items():
            as_user(conn, u)

        def insert(table: str, user: uuid.UUID, request: dict[str, Any], owner: Any) -> None:
            cols = {**request, "created_by": owner}
            cols["params"] = json.dumps(cols["params"])
            names = ", ".join(cols)
            marks = ", ".join(["%s"] * len(cols))
            try:
                conns[user].execute(
                    f"insert into {table} ({names}) values ({marks})", list(cols.values())
                )
            except psycopg.Error as exc:
                assert exc.sqlstate in REFUSALS, (exc.sqlstate, str(exc), request)
                refused[str(exc.sqlstate)] = refused.get(str(exc.sqlstate), 0) + 1

        @FUZZ
        @given(
            st.sampled_from(USERS),
            st.sampled_from([*USERS, VICTIM]),
            course_requests | media_requests,
        )
        def request(user: uuid.UUID, owner: uuid.UUID, req: dict[str, Any]) -> None:
            insert("ai_course_jobs" if "subject" in req else "ai_media_jobs", user, req, owner)

        try:
            request()
        finally:
            for conn in conns.values():
                conn.close()
        assert refused.get("42501") and refused.get("23514"), refused

        with connect(supabase_db_url) as c:

            def all_ended() -> bool:
                row = c.execute(
                    "select count(*) filter (where status not in ('done', 'dead_letter')) as open,"
                    " count(*) as n from (select status from ai_course_jobs union all"
                    " select status from ai_media_jobs) j"
                ).fetchone()
                return row["open"] == 0 and row["n"] > 1

            wait_until(all_ended, timeout=90, what="every fuzzed job ended")
            assert (
                c.execute("select * from ai_course_catalog where course_id = 'victim'").fetchone()
                == victim_catalog
            )
            owners = c.execute(
                "select count(*) from ai_course_jobs where course_id = 'victim'"
                " and created_by is distinct from %s",
                [VICTIM],
            ).fetchone()
            assert owners["count"] == 0
        assert (victim_file.read_bytes(), victim_file.stat().st_mtime_ns) == victim_before
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    # invalid requests end in the dead letter (logged as errors); nothing else may fail
    assert [
        e
        for e in w.events()
        if e["level"] in ("ERROR", "CRITICAL") and e.get("action") != "job_dead_letter"
    ] == []
    for args in (["status", "--json"], ["alerts", "--json"], ["jobs", "--json", "--limit", "500"]):
        p = subprocess.run(
            [*AI_JOBS, *args],
            env=env(supabase_db_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode in (0, 1) and "error" not in p.stderr, (args, p.stderr)
        json.loads(p.stdout)
