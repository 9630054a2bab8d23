"""The real `ai-jobs worker` against hostile clients: notifications from any role,
courses asked for by two users, and secrets that providers echo back."""

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
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from listener.notifications import parse_payload
from tests import fakeai
from tests.fakeai import FakeAI
from tests.helpers import AI_JOBS, connect, env, job, wait_until
from tests.supabase import as_anon, as_user
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = uuid.uuid4(), uuid.uuid4()

HOSTILE_PAYLOADS = [
    "[" * 7000,  # the issue's: RecursionError in json.loads
    "{" * 7999,
    '{"table": ' * 700,
    json.dumps({"table": ["ai_course_jobs"]}),  # unhashable where a name was expected
    json.dumps({"table": {"x": 1}}),
    json.dumps({"table": "ai_course_jobs", "id": 12}),
    json.dumps({"table": "ai_course_jobs", "id": "not-a-uuid"}),
    json.dumps({"table": "pg_authid"}),
    "null",
    '"ai_course_jobs"',
    "1e999999",
    "NaN",
    "é" * 3000,
    "x" * 7999,
    "{" + '"a":1,' * 1300 + '"table":"ai_course_jobs"}',
]


KNOCK = "knock-knock"


def notify(url: str, payloads: list[str]) -> None:
    """As a browser holding the anon key: pg_notify is everyone's."""
    with connect(url) as c:
        as_anon(c)
        for p in payloads:
            c.execute("select pg_notify('ai_jobs', %s)", [p])


def test_no_notification_stops_the_worker(supabase_db_url: str) -> None:
    w = WorkerProcess(supabase_db_url).started()
    try:
        # "worker started" may come before its LISTEN: knock until it answers;
        # the knocks are left out of the counts below.
        def heard() -> bool:
            notify(supabase_db_url, [KNOCK])
            return bool(w.actions("bad_payload"))

        def hostile() -> list[dict[str, Any]]:
            return [e for e in w.actions("bad_payload") if KNOCK not in e["message"]]

        wait_until(heard, interval=0.2, what="the worker listening")
        notify(supabase_db_url, HOSTILE_PAYLOADS)
        bad = [p for p in HOSTILE_PAYLOADS if not _valid(p)]
        wait_until(lambda: len(hostile()) >= len(bad), what="every payload read")
        # The LISTEN task is still there: a new job starts on its notification
        # (the sweep runs hourly here).
        with connect(supabase_db_url) as c:
            as_user(c, ALICE)
            row = c.execute(
                "insert into ai_course_jobs (subject, created_by) values ('Still alive',"
                " auth.uid()) returning id"
            ).fetchone()
        with connect(supabase_db_url) as c:
            wait_until(lambda: job(c, str(row["id"]))["status"] == "done", what="job done")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert len(hostile()) == len(bad)
    errors = [e for e in w.events() if e["level"] in ("ERROR", "CRITICAL")]
    assert errors == [], errors
    assert "Traceback" not in w.log()


def _valid(payload: str) -> bool:
    try:
        parse_payload(payload)
    except Exception:
        return False
    return True


def _insert(url: str, user: uuid.UUID, subject: str, **cols: Any) -> tuple[str, str]:
    with connect(url) as c:
        as_user(c, user)
        names = ", ".join(["subject", "created_by", *cols])
        marks = ", ".join(["%s", "auth.uid()", *(["%s"] * len(cols))])
        row = c.execute(
            f"insert into ai_course_jobs ({names}) values ({marks}) returning id, course_id",
            [subject, *cols.values()],
        ).fetchone()
    return str(row["id"]), str(row["course_id"])


def _done(url: str, job_id: str) -> dict[str, Any]:
    with connect(url) as c:
        wait_until(lambda: job(c, job_id)["status"] == "done", what=f"job {job_id} done")
        return job(c, job_id)


def _catalog(url: str, course_id: str) -> dict[str, Any]:
    with connect(url) as c:
        row = c.execute(
            "select * from ai_course_catalog where course_id = %s", [course_id]
        ).fetchone()
    assert row is not None
    return dict(row)


def _catalog_file(storage: Path) -> dict[str, str] | None:
    try:
        catalog = json.loads((storage / "courses/catalog.json").read_bytes())
    except FileNotFoundError:
        return None
    return {c["id"]: c["jobId"] for c in catalog["courses"]}


def test_a_course_made_by_another_user_is_never_overwritten(supabase_db_url: str) -> None:
    storage = Path(tempfile.mkdtemp())
    w = WorkerProcess(
        supabase_db_url,
        STORAGE_URL=storage,
        CACHE_TTL_SECONDS="0",  # every job generates and writes
        CATALOG_BATCH_JOBS="1",
    ).started()
    try:
        alices, course = _insert(supabase_db_url, ALICE, "Algebra")
        _done(supabase_db_url, alices)
        path = storage / "courses" / course / "course.json"
        before = (path.read_bytes(), path.stat().st_mtime_ns, _catalog(supabase_db_url, course))

        # Bob asks the same subject: his own course, elsewhere
        bobs, bobs_course = _insert(supabase_db_url, BOB, "Algebra")
        assert bobs_course != course
        assert _done(supabase_db_url, bobs)["result_path"] == f"courses/{bobs_course}/course.json"
        # ... and cannot name Alice's
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _insert(supabase_db_url, BOB, "Anything", course_id=course)
        after = (path.read_bytes(), path.stat().st_mtime_ns, _catalog(supabase_db_url, course))
        assert after == before
        # catalog.json is rendered after the completion that carries its row commits
        wanted = {course: alices, bobs_course: bobs}
        wait_until(lambda: _catalog_file(storage) == wanted, what=f"catalog.json lists {wanted}")

        # Alice regenerates her own
        again, same = _insert(supabase_db_url, ALICE, "algebra")
        assert same == course
        _done(supabase_db_url, again)
        assert _catalog(supabase_db_url, course)["job_id"] == uuid.UUID(again)
        assert path.stat().st_mtime_ns != before[1]
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_secrets_echoed_by_a_provider_reach_neither_the_job_nor_the_log(
    db_url: str, fake: FakeAI
) -> None:
    """Planted bug: a provider's error quoting the key, a database URL with its
    password, written unscrubbed to the job's error or to a log line."""
    openai_key = f"sk-proj-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    anthropic_key = f"sk-ant-api03-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    params = conninfo_to_dict(db_url)
    user, port, host = params.get("user", "postgres"), params.get("port", 5432), params["host"]
    if str(host).startswith("/"):  # a Unix socket (the embedded server): host in the query
        dsn = f"postgresql://{user}:{password}@/{params['dbname']}?host={host}&port={port}"
    else:
        dsn = f"postgresql://{user}:{password}@{host}:{port}/{params['dbname']}"
    fake.keys = {"openai": openai_key, "anthropic": anthropic_key}
    fake.modes.update(openai="401", anthropic="401")  # each answers quoting the key it got
    w = WorkerProcess(
        dsn,
        OPENAI_API_KEY=openai_key,
        OPENAI_BASE_URL=fake.openai_url,
        ANTHROPIC_API_KEY=anthropic_key,
        ANTHROPIC_BASE_URL=fake.anthropic_url,
        ALLOW_PLACEHOLDER="0",
        MAX_RETRIES="1",
    ).started()
    try:
        with connect(db_url) as c:
            jid = str(
                c.execute(
                    "insert into ai_course_jobs (subject, max_retries) values ('Keys', 1)"
                    " returning id"
                ).fetchone()["id"]
            )
            # Both keys refused: the job waits for the providers (their breakers
            # open), with the reason as its error.
            wait_until(lambda: "401" in (job(c, jid)["error"] or ""), what="the refusal")
            error = job(c, jid)["error"]
            reasons = " ".join(
                str(r["cooldown_reason"])
                for r in c.execute("select cooldown_reason from ai_job_provider_state")
            )
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert fake.count("openai") and fake.count("anthropic")  # the keys did go out
    assert "HTTP 401" in error
    log = w.log()
    for secret in (openai_key, anthropic_key, password):
        assert secret not in error
        assert secret not in reasons
        assert secret not in log
        assert secret[-12:] not in log  # nor its tail (OpenAI quotes a key's last characters)
    assert "***" in log


def test_the_worker_and_the_reports_run_as_service_role(supabase_db_url: str) -> None:
    """service_role's grants are enough for everything the worker and the
    operators' commands do: claims, completions, the catalog, the sweep, the
    alert monitor's samples and transitions."""
    params = conninfo_to_dict(supabase_db_url)
    as_service_role = make_conninfo("", **params, options="-c role=service_role")
    storage = Path(tempfile.mkdtemp())
    w = WorkerProcess(
        as_service_role,
        STORAGE_URL=storage,
        ALERT_INTERVAL_SECONDS="0.2",
        CATALOG_BATCH_JOBS="1",
        CACHE_TTL_SECONDS="0",
    ).started()
    try:
        with connect(as_service_role) as c:
            assert c.execute("select current_user as u").fetchone()["u"] == "service_role"
            course = str(
                c.execute(
                    "insert into ai_course_jobs (subject, created_by) values ('Roles', %s)"
                    " returning id",
                    [ALICE],
                ).fetchone()["id"]
            )
            wait_until(lambda: job(c, course)["status"] == "done", what="course done")
        wait_until(lambda: (storage / "courses/catalog.json").exists(), what="catalog")
        with connect(supabase_db_url) as c:
            wait_until(
                lambda: c.execute("select count(*) from ai_job_counter_samples").fetchone()[
                    "count"
                ],
                what="an alert tick",
            )
        for args in (["status"], ["alerts"], ["jobs"], ["stuck"], ["rate-limit"], ["dead-letter"]):
            p = subprocess.run(
                [*AI_JOBS, *args], env=env(as_service_role), capture_output=True, text=True
            )
            assert p.returncode == 0, (args, p.stderr)
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    failed = [e for e in w.events() if e["level"] in ("ERROR", "CRITICAL", "WARNING")]
    assert failed == [], failed


# -- round two ---------------------------------------------------------------------


def _provider_worker(url: str, fake: FakeAI, **extra: Any) -> WorkerProcess:
    return WorkerProcess(
        url,
        OPENAI_API_KEY=fakeai.FAKE_OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_url,
        AI_PROVIDER_PRIORITY="openai",
        ALLOW_PLACEHOLDER="0",
        RETRY_BASE_SECONDS="0.1",
        **extra,
    ).started()


def _budget(url: str, cap: float, estimate: float) -> None:
    with connect(url) as c:
        c.execute(
            "update ai_job_settings set daily_budget_usd_per_user = %s,"
            " budget_estimate_usd_per_job = %s",
            [cap, estimate],
        )


def test_cancelling_a_running_job_does_not_dodge_the_budget(
    supabase_db_url: str, fake: FakeAI
) -> None:
    """The issue's dodge, against the real worker: with a cap of one job, insert,
    wait for the provider call, cancel_job, insert again."""
    _budget(supabase_db_url, 0.05, 0.05)
    fake.modes["openai"] = "hang"
    w = _provider_worker(supabase_db_url, fake, AI_TIMEOUT_SECONDS="60", CACHE_TTL_SECONDS="0")
    try:
        first, _ = _insert(supabase_db_url, ALICE, "Dodge")
        wait_until(lambda: fake.count("openai", "/chat/completions") == 1, what="provider call")
        with connect(supabase_db_url) as c:
            as_user(c, ALICE)
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [first])
        wait_until(lambda: fake.abandoned, what="the provider call abandoned")
        with pytest.raises(psycopg.Error) as refused:
            _insert(supabase_db_url, ALICE, "Dodge again")
        assert refused.value.sqlstate == "AJ402"
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_every_call_the_providers_billed_counts_toward_the_budget(
    supabase_db_url: str, fake: FakeAI
) -> None:
    """A job whose every answer is invalid: three attempts of an answer and its
    repair round, six billed calls, then the dead letter. Its spend is those six
    calls (none of it was counted before: a dead-letter job cost nothing)."""
    _budget(supabase_db_url, 0.0001, 0)  # nothing reserved: the spend is what was paid
    fake.modes["openai"] = "invalid"
    w = _provider_worker(supabase_db_url, fake, CACHE_TTL_SECONDS="0")
    try:
        jid, _ = _insert(supabase_db_url, ALICE, "Never valid")
        with connect(supabase_db_url) as c:
            wait_until(lambda: job(c, jid)["status"] == "dead_letter", what="the dead letter")
            calls = fake.count("openai", "/chat/completions")
            assert calls == 6
            spend = c.execute(
                "select ai_job_user_spend(%s, now() - interval '1 day')::float8 as usd", [ALICE]
            ).fetchone()["usd"]
            assert spend > 0.0001
            with pytest.raises(psycopg.Error) as refused:
                _insert(supabase_db_url, ALICE, "More")
            assert refused.value.sqlstate == "AJ402"
            charges = c.execute(
                "select count(*) as n, sum(cost_usd)::float8 as usd from ai_job_charges"
                " where job_id = %s and created_by = %s",
                [jid, ALICE],
            ).fetchone()
        assert charges["n"] == calls and spend == pytest.approx(charges["usd"])
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_a_course_from_the_cache_names_no_other_users_job(
    supabase_db_url: str, fake: FakeAI
) -> None:
    """Bob's request is served with the course Alice's job made: his readable
    metrics must not carry her job's id."""
    w = _provider_worker(supabase_db_url, fake)
    try:
        alices, _ = _insert(supabase_db_url, ALICE, "Astronomy")
        _done(supabase_db_url, alices)
        bobs, _ = _insert(supabase_db_url, BOB, "Astronomy")
        _done(supabase_db_url, bobs)
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    with connect(supabase_db_url) as c:
        as_user(c, BOB)
        row = c.execute(
            "select id, status, metrics, result_path, error from ai_course_jobs where id = %s",
            [bobs],
        ).fetchone()
    assert row["metrics"]["provider"] == "cache" and row["metrics"]["cacheHit"] is True
    assert alices not in json.dumps(row, default=str)
    assert fake.count("openai", "/chat/completions") == 1


def test_a_forged_pause_notification_is_not_believed(supabase_db_url: str) -> None:
    """Anyone may NOTIFY the channel: a pause payload nobody sent through
    pause_jobs must not make the worker log that a job type was paused."""
    w = WorkerProcess(supabase_db_url).started()
    try:

        def heard() -> bool:
            notify(supabase_db_url, [KNOCK])
            return bool(w.actions("bad_payload"))

        wait_until(heard, interval=0.2, what="the worker listening")
        notify(supabase_db_url, [json.dumps({"table": "ai_course_jobs", "paused": True})])
        w.wait_for("pause_unconfirmed", timeout=10)
        assert not w.actions("table_paused")
        # a real pause is logged as before
        with connect(supabase_db_url) as c:
            c.execute("select pause_jobs('ai_course_jobs')")
        event = w.wait_for("table_paused", timeout=10)
        assert event["table"] == "ai_course_jobs"
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
