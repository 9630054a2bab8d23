"""Start-up fails fast and says why: every configuration mistake ends
`ai-jobs worker` and `ai-jobs run-once` within seconds, exit status 1, with one
line on stderr that names the setting, and no connection left open: a database
that cannot be reached at all, storage that cannot be written, settings that
contradict each other, as well as a value that is invalid alone."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests import fakesupabase
from tests.helpers import AI_JOBS, env
from tests.pgserver import free_port
from tests.workers import WorkerProcess

WITHIN_SECONDS = 10.0  # a Python start-up on a loaded machine, not a database timeout

MISTAKES = {
    "storage scheme": (
        {"STORAGE_URL": "ftp://files.example/courses"},
        "STORAGE_URL: unsupported scheme 'ftp'",
    ),
    "supabase without its key": (
        {"STORAGE_URL": "supabase://project.supabase.co/courses"},
        "STORAGE_URL is a Supabase URL: set SUPABASE_SERVICE_ROLE_KEY",
    ),
    "malformed DATABASE_URL": (
        {"DATABASE_URL": "postgresql://[::1"},
        "DATABASE_URL is not a valid connection string",
    ),
    "bad number": ({"WORKER_CONCURRENCY": "0"}, "Invalid setting WORKER_CONCURRENCY"),
    "unknown listen mode": ({"LISTEN_MODE": "sometimes"}, "Invalid setting LISTEN_MODE"),
    "unknown provider": (
        {"AI_PROVIDER_PRIORITY": "openai,gemini"},
        "Invalid setting AI_PROVIDER_PRIORITY",
    ),
    "bad Sentry DSN": ({"SENTRY_DSN": "not-a-dsn"}, "SENTRY_DSN is not a valid Sentry DSN"),
    "storage that does not exist": (
        {"STORAGE_URL": "/proc/nope"},
        "STORAGE_URL: cannot write to /proc/nope: No such file or directory",
    ),
    "storage under a file": (
        {"STORAGE_URL": "/dev/null/results"},
        "STORAGE_URL: cannot write to /dev/null/results: Not a directory",
    ),
    "stale rescue quicker than the heartbeat": (
        {"HEARTBEAT_INTERVAL_SECONDS": "30", "STALE_AFTER_SECONDS": "12"},
        "STALE_AFTER_SECONDS (12) must be at least 3 x HEARTBEAT_INTERVAL_SECONDS (30)",
    ),
    "stale rescue just under the margin": (
        {"HEARTBEAT_INTERVAL_SECONDS": "10", "STALE_AFTER_SECONDS": "29.9"},
        "STALE_AFTER_SECONDS (29.9) must be at least 3 x HEARTBEAT_INTERVAL_SECONDS (10)",
    ),
    "infinite duration": (
        {"STALE_AFTER_SECONDS": "inf"},
        "Invalid setting STALE_AFTER_SECONDS: Input should be a finite number",
    ),
    "not a number": (
        {"SWEEP_INTERVAL_SECONDS": "nan"},
        "Invalid setting SWEEP_INTERVAL_SECONDS: Input should be a finite number",
    ),
    "unknown log level": ({"LOG_LEVEL": "verbose"}, "Invalid setting LOG_LEVEL: must be one of"),
}


def _run(command: str, db_url: str | None, **settings: str) -> tuple[int, list[str], float]:
    base = {"ALLOW_PLACEHOLDER": "1", "LOG_FORMAT": "text"}
    e = env(db_url, **base)
    e.update(settings)
    t0 = time.monotonic()
    p = subprocess.run([*AI_JOBS, command], env=e, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr.splitlines(), time.monotonic() - t0


@pytest.mark.parametrize("command", ["worker", "run-once"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_configuration_mistake_ends_the_process_with_one_line(
    command: str, mistake: str, db_url: str
) -> None:
    settings, says = MISTAKES[mistake]
    code, stderr, took = _run(command, db_url, **settings)
    assert code == 1
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("ai-jobs: error: ") and says in stderr[0], stderr
    assert took < WITHIN_SECONDS
    if "SENTRY_DSN" in settings:
        assert settings["SENTRY_DSN"] not in stderr[0]


def test_an_api_key_of_spaces_counts_as_unset(db_url: str) -> None:
    """As an empty one: with no other provider, the worker does not start."""
    code, stderr, took = _run("worker", db_url, OPENAI_API_KEY="   ", ALLOW_PLACEHOLDER="0")
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith("ai-jobs: error: No AI provider configured: set OPENAI_API_KEY")
    assert took < WITHIN_SECONDS


@pytest.mark.parametrize("command", ["worker", "run-once"])
def test_no_database_url(command: str) -> None:
    code, stderr, took = _run(command, None)
    assert (code, stderr) == (1, ["ai-jobs: error: DATABASE_URL is not set"])
    assert took < WITHIN_SECONDS


@pytest.mark.parametrize("command", ["worker", "run-once"])
def test_an_unmigrated_database(command: str, empty_db_url: str) -> None:
    code, stderr, took = _run(command, empty_db_url)
    assert code == 1
    assert len(stderr) == 1 and "run `ai-jobs migrate`" in stderr[0], stderr
    assert took < WITHIN_SECONDS


def _server_url(db_url: str, **change: str) -> str:
    """db_url with other connection parameters (the password is never checked
    by the test server: trust authentication)."""
    params = conninfo_to_dict(db_url) | {"password": PASSWORD, **change}
    return make_conninfo("", **params)


def _where(params: dict[str, Any]) -> str:
    """Where the start's messages say the database is: host:port, or the socket's
    folder (the embedded server of a run without TEST_DATABASE_URL)."""
    host = str(params.get("host") or "")
    if host.startswith("/"):
        return f"[socket {host}]"
    return f"{host}:{params.get('port') or 5432}"


PASSWORD = "pw-never-shown-8d2f"
UNREACHABLE = {
    # Over TCP whatever the test server listens on: nothing answers on that port.
    "closed port": ({"host": "127.0.0.1", "port": "CLOSED"}, "failed: Connection refused"),
    "unknown role": ({"user": "no_such_role_28"}, 'role "no_such_role_28" does not exist'),
    "missing database": ({"dbname": "no_such_db_28"}, 'database "no_such_db_28" does not exist'),
    # A Supabase-style pooler URL (user postgres.<project>) on a port nothing serves.
    "closed pooler port": (
        {
            "user": "postgres.abcdefghijklmnopqrst",
            "host": "127.0.0.1",
            "port": "CLOSED",
            "sslmode": "disable",
        },
        "failed: Connection refused",
    ),
}


@pytest.mark.parametrize("command", ["worker", "run-once"])
@pytest.mark.parametrize("case", list(UNREACHABLE))
def test_a_database_that_cannot_be_reached_at_start_is_a_configuration_error(
    command: str, case: str, db_url: str
) -> None:
    """Not the pool's silent retries: exit 1 at once, with the cause."""
    change, cause = UNREACHABLE[case]
    change = {k: str(free_port()) if v == "CLOSED" else v for k, v in change.items()}
    url = _server_url(db_url, **change)
    code, stderr, took = _run(command, url)
    assert code == 1
    assert len(stderr) == 1, stderr
    line = stderr[0]
    assert line.startswith("ai-jobs: error: DATABASE_URL: cannot connect to "), line
    assert cause in line, line
    where = f"{_where(conninfo_to_dict(url))}/"
    assert where in line and "password ***" in line, line  # where it went; never the password
    assert PASSWORD not in line
    assert took < WITHIN_SECONDS


def test_supabase_bucket_that_does_not_exist(db_url: str) -> None:
    with fakesupabase.running() as fake:
        fake.missing_buckets = {"results"}
        code, stderr, took = _run(
            "worker",
            db_url,
            STORAGE_URL=f"{fake.storage_url}/results",
            SUPABASE_SERVICE_ROLE_KEY=fake.key,
        )
    assert code == 1 and len(stderr) == 1, stderr
    assert "STORAGE_URL: bucket 'results' of http://127.0.0.1:" in stderr[0]
    assert "does not exist" in stderr[0] and fake.key not in stderr[0]
    assert fake.uploads == 0
    assert took < WITHIN_SECONDS


def test_the_start_line_shows_where_the_database_is_but_not_the_password(db_url: str) -> None:
    url = _server_url(db_url)
    params = conninfo_to_dict(db_url)
    w = WorkerProcess(url).started()
    try:
        line = w.wait_for("worker_config")["message"]
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    where = f"{_where(params)}/{params['dbname']}"
    assert f"database {where} (user {params['user']}, password ***)" in line, line
    assert PASSWORD not in w.log()
