"""Errors of ai-jobs, and the one place where database errors become ours.

AiJobsError
├── ConfigError             a setting is missing or invalid
├── DatabaseUnavailable     cannot reach PostgreSQL
│   └── DatabaseBusy        reached, but it did not serve the request in time
├── SchemaOutdated          the database needs `ai-jobs migrate`
├── UnknownJobTable         a table name other than the two job tables
├── JobNotFound             no job with that id
├── JobBusy                 the job is running and cannot be changed now
├── RateLimitExceeded       the user inserted too many jobs this hour
├── BudgetExceeded          the user's jobs of the last 24 h cost more than the cap
├── PermissionDenied        the database refused the role (e.g. another user's course_id)
├── InvalidJob              a job row or its params cannot be processed, or a request
│   │                       breaks a limit the database enforces
│   └── RequestRefused      every provider refused the request (retrying cannot help)
├── GenerationError         every provider failed for one attempt
│   └── ProvidersUnavailable  every provider is down or rate-limited: wait, count nothing
└── HandedOff               the job went to a provider's batch (listener/batches/)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import psycopg


class AiJobsError(Exception):
    """Unexpected ai-jobs error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or type(self).__name__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(AiJobsError):
    """Invalid configuration."""


class DatabaseUnavailable(AiJobsError):
    """Cannot connect to PostgreSQL."""


class DatabaseBusy(DatabaseUnavailable):
    """PostgreSQL did not serve the request in time."""


class SchemaOutdated(AiJobsError):
    """The database schema is older than this code: run `ai-jobs migrate`."""


class UnknownJobTable(AiJobsError):
    """Unknown job table (expected ai_course_jobs or ai_media_jobs)."""


class JobNotFound(AiJobsError):
    """Job not found."""


class JobBusy(AiJobsError):
    """The job is being processed."""


class RateLimitExceeded(AiJobsError):
    """Rate limit exceeded."""


class BudgetExceeded(AiJobsError):
    """Budget exceeded."""


class PermissionDenied(AiJobsError):
    """Permission denied."""


class InvalidJob(AiJobsError):
    """Invalid job."""


class RequestRefused(InvalidJob):
    """Every provider refused the request."""


class GenerationError(AiJobsError):
    """Generation failed."""


class ProvidersUnavailable(GenerationError):
    """Every provider of the chain is down or rate-limited. The worker puts the job
    back to pending, due in `wait_seconds`, without counting an attempt."""

    def __init__(self, message: str, wait_seconds: float, quota: bool = False) -> None:
        super().__init__(message)
        self.wait_seconds = wait_seconds
        self.quota = quota  # for quotas alone (no breaker open): routine under load


class HandedOff(AiJobsError):
    """The job went to a provider's batch (listener/batches/): it holds the batch's
    token now, and its worker writes nothing more about it."""


# A reachable server that would not serve the request in time: a statement or
# lock timeout, a cancel request, its connection limit (retry, as when it is away).
_BUSY_SQLSTATES = ("57014", "55P03", "53300")

# SQLSTATEs raised by sql/003_functions.sql, and what they mean to us.
_BY_SQLSTATE: dict[str, type[AiJobsError]] = {
    "22023": UnknownJobTable,  # invalid_parameter_value
    "P0002": JobNotFound,  # no_data_found
    "55000": JobBusy,  # object_not_in_prerequisite_state
    "AJ429": RateLimitExceeded,
    "AJ402": BudgetExceeded,  # sql/015_budgets.sql
    "23514": InvalidJob,  # check_violation: a request over a limit (sql/011)
    "42501": PermissionDenied,  # insufficient_privilege
}

_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords in connection strings that an error message may quote."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


# What a credential looks like wherever it is quoted: an OpenAI or Anthropic key,
# an HTTP Authorization value (whatever its length), a JWT (Supabase keys).
_TOKENS = re.compile(
    r"(sk-(?:ant-)?[A-Za-z0-9_\-]{8,})"
    r"|((?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=\-]+"
    r"|(eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*)",
    re.IGNORECASE,
)
MAX_ERROR = 2000


_TOKEN_MARKERS = ("sk-", "bearer", "basic", "eyj")  # lower case: what _TOKENS needs


def _hide_token(m: re.Match[str]) -> str:
    return (m.group(2) or "") + "***"


class Scrubber:
    """Hides given secret values, passwords in URLs and anything shaped like a
    key or a bearer token; the secrets are compiled once, for text scrubbed over
    and over (every log line)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, found))) if found else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub("***", text)
        # The patterns run only on text that can hold what they look for: most log
        # lines hold none of it, and each pattern costs microseconds per line.
        low = text.lower()
        if ("://" in text and "@" in text) or "password" in low:
            text = redact(text)
        if any(marker in low for marker in _TOKEN_MARKERS):
            text = _TOKENS.sub(_hide_token, text)
        return text


@runtime_checkable
class HasSecrets(Protocol):
    def secrets(self) -> list[str]: ...


def scrub(text: str, secrets: HasSecrets | Iterable[str] | None = None) -> str:
    """Text fit for a job row, a log line, a provider's error or a Sentry event: no
    secret value (`secrets`: the Settings, or the values themselves), no password
    in a URL, no API-key-looking token, at most MAX_ERROR characters. The one
    scrubbing path: logs.py and telemetry.py use the same Scrubber."""
    # The Settings first: a pydantic model is iterable too (its fields).
    values = secrets.secrets() if isinstance(secrets, HasSecrets) else secrets or ()
    text = Scrubber(values)(text)
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


def error_text(exc: BaseException) -> str:
    """An exception as one human-readable line (not yet scrubbed)."""
    if isinstance(exc, AiJobsError):
        return exc.message
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translate(exc: BaseException) -> AiJobsError:
    """Turn a psycopg error into ours, by SQLSTATE class, never by message text."""
    if isinstance(exc, AiJobsError):
        return exc
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        primary = diag.message_primary or str(exc).strip().splitlines()[0]
        state = exc.sqlstate or ""
        if state in _BY_SQLSTATE:
            return _BY_SQLSTATE[state](primary)
        if state in _BUSY_SQLSTATES:
            return DatabaseBusy(f"PostgreSQL did not serve the request in time: {redact(primary)}")
        if state in ("42P01", "42883"):  # undefined_table, undefined_function
            return SchemaOutdated(
                f"The database has no ai-jobs schema ({primary}): run `ai-jobs migrate`"
            )
        if isinstance(exc, psycopg.OperationalError) or state.startswith("08"):
            return DatabaseUnavailable(f"Cannot reach PostgreSQL: {redact(primary)}")
        return AiJobsError(f"Database error: {redact(primary)}")
    return AiJobsError(f"{type(exc).__name__}: {redact(str(exc))}")
