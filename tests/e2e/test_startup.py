"""Start-up fails fast and says why: every configuration mistake ends
`ai-jobs worker` and `ai-jobs run-once` within seconds, exit status 1, with one
line on stderr that names the setting, and no connection left open."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import AI_JOBS, env

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
