"""The worker's checks at start: what would otherwise fail later, job after job or
silently, is refused now with one line that names the setting (exit 1; a platform
restarts the process, and its log says why).

- Settings that contradict each other: STALE_AFTER_SECONDS against
  HEARTBEAT_INTERVAL_SECONDS.
- DATABASE_URL: one connection, now. A database that cannot be reached at all
  at start (a closed port, an unknown role, a missing database) is a
  configuration error, not an outage to wait out: the pool would retry it
  forever and say only that it could not get a connection. libpq gives no
  SQLSTATE for a failed connection, so every failure counts alike, a server
  still starting or at its connection limit too: the platform's restart is the
  retry. Once the worker has run, a lost database is an outage: the worker waits
  for it (outage.py).
- STORAGE_URL: a write, as a job's result would be written (a local folder:
  a probe file written and removed; Supabase Storage: the bucket exists and the
  key may write). Otherwise every job would pay for its generation, fail to
  store it, and retry until the dead letter.
"""

from __future__ import annotations

import psycopg

from listener import db
from listener.errors import ConfigError, redact
from listener.settings import Settings
from listener.storage import Storage

# STALE_AFTER_SECONDS >= STALE_MARGIN x HEARTBEAT_INTERVAL_SECONDS: a running job
# is declared lost only after it missed two heartbeats in a row, so one late
# heartbeat (a slow write, a short network stall, a busy event loop) never makes
# a live job stale, to be claimed and run a second time while it still runs here.
STALE_MARGIN = 3
CONNECT_SECONDS = 5  # the start-up connection's connect_timeout


def check_settings(settings: Settings) -> None:
    """Settings that are valid alone but contradict each other."""
    beat, stale = settings.heartbeat_interval_seconds, settings.stale_after_seconds
    if stale < STALE_MARGIN * beat:
        raise ConfigError(
            f"STALE_AFTER_SECONDS ({stale:g}) must be at least {STALE_MARGIN} x "
            f"HEARTBEAT_INTERVAL_SECONDS ({beat:g}), i.e. {STALE_MARGIN * beat:g}: a running "
            "job whose heartbeat is older than STALE_AFTER_SECONDS is taken for lost and run "
            "again elsewhere, so it must survive a missed heartbeat or two"
        )


async def check_database(dsn: str) -> None:
    """Connect once; a failure is a ConfigError that says why (never the password)."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=CONNECT_SECONDS, application_name="ai-jobs start"
        )
    except psycopg.Error as exc:
        raise ConfigError(
            f"DATABASE_URL: cannot connect to {db.describe(dsn)}: {connect_failure(exc)}"
        ) from None
    await conn.close()


def connect_failure(exc: BaseException) -> str:
    """libpq's reason on one line: its hints (indented lines) dropped; with
    several hosts, each host's failure."""
    lines = [line for line in str(exc).splitlines() if line.strip() and line[0] not in " \t"]
    each = [line.split("connection failed: ", 1)[-1] for line in lines if line.startswith("- ")]
    if each:
        text = "; ".join(each)
    else:
        text = lines[0].removeprefix("connection failed: ") if lines else ""
    return redact(" ".join(text.split())) or type(exc).__name__


async def run(settings: Settings, dsn: str, storage: Storage) -> None:
    """Every check, cheapest first; the first failure is raised."""
    check_settings(settings)
    await storage.check()
    await check_database(dsn)
