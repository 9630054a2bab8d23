"""Errors of ai-jobs, and the one place where database errors become ours.

AiJobsError
├── ConfigError             a setting is missing or invalid
├── DatabaseUnavailable     cannot reach PostgreSQL
├── SchemaOutdated          the database needs `ai-jobs migrate`
├── UnknownJobTable         a table name other than the two job tables
├── JobNotFound             no job with that id
├── JobBusy                 the job is running and cannot be changed now
├── RateLimitExceeded       the user inserted too many jobs this hour
├── BudgetExceeded          the user's jobs of the last 24 h cost more than the cap
├── InvalidJob              a job row or its params cannot be processed
│   └── RequestRefused      every provider refused the request (retrying cannot help)
└── GenerationError         every provider failed for one attempt
    └── ProvidersUnavailable  every provider is down or rate-limited: wait, count nothing
"""

from __future__ import annotations

import re

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


class InvalidJob(AiJobsError):
    """Invalid job."""


class RequestRefused(InvalidJob):
    """Every provider refused the request."""


class GenerationError(AiJobsError):
    """Generation failed."""


class ProvidersUnavailable(GenerationError):
    """Every provider of the chain is down or rate-limited. The worker puts the job
    back to pending, due in `wait_seconds`, without counting an attempt."""

    def __init__(self, message: str, wait_seconds: float) -> None:
        super().__init__(message)
        self.wait_seconds = wait_seconds


# SQLSTATEs raised by sql/003_functions.sql, and what they mean to us.
_BY_SQLSTATE: dict[str, type[AiJobsError]] = {
    "22023": UnknownJobTable,  # invalid_parameter_value
    "P0002": JobNotFound,  # no_data_found
    "55000": JobBusy,  # object_not_in_prerequisite_state
    "AJ429": RateLimitExceeded,
    "AJ402": BudgetExceeded,  # sql/015_budgets.sql
}

_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords in connection strings that an error message may quote."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


_TOKENS = re.compile(
    r"(sk-(?:ant-)?[A-Za-z0-9_\-]{8,})|((?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE
)
MAX_ERROR = 2000


def scrub(text: str, settings: object | None = None) -> str:
    """An error message fit for a job row or a log line: no secret of the settings,
    no password in a URL, no API-key-looking token, at most MAX_ERROR characters."""
    from pydantic import SecretStr

    if settings is not None:
        for name in type(settings).model_fields:  # type: ignore[attr-defined]
            value = getattr(settings, name, None)
            if isinstance(value, SecretStr):
                secret = value.get_secret_value()
                if len(secret) >= 4:
                    text = text.replace(secret, "***")
    text = _TOKENS.sub(lambda m: (m.group(2) or "") + "***", redact(text))
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


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
        if state in ("42P01", "42883"):  # undefined_table, undefined_function
            return SchemaOutdated(
                f"The database has no ai-jobs schema ({primary}): run `ai-jobs migrate`"
            )
        if isinstance(exc, psycopg.OperationalError) or state.startswith("08"):
            return DatabaseUnavailable(f"Cannot reach PostgreSQL: {redact(primary)}")
        return AiJobsError(f"Database error: {redact(primary)}")
    return AiJobsError(f"{type(exc).__name__}: {redact(str(exc))}")
