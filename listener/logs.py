"""Logging setup: loguru to stderr, as text or one JSON object per line.

Every record is scrubbed before any sink sees it (errors.Scrubber): the settings'
secret values, passwords in URLs and key- or token-shaped text never reach a log
line, whichever code logged them and however (an exception's text quoted in a
message, a value bound as an extra field).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from loguru import logger

from listener import tracing
from listener.errors import Scrubber


class _ToLoguru(logging.Handler):
    """psycopg's and psycopg_pool's warnings (a failed connection attempt of the
    pool, one per retry during an outage) at debug level: the worker logs the
    outage itself, once, as a transition. (Scrubbed like every record.)"""

    def emit(self, record: logging.LogRecord) -> None:
        logger.bind(action="psycopg", logger=record.name).debug(record.getMessage())


def scrubbing(secrets: Iterable[str] = ()) -> Any:
    """A loguru patcher that scrubs the message and every text extra field, and,
    while tracing is on, adds the current trace_id and span_id (listener/tracing.py)."""
    scrub = Scrubber(secrets)

    def patch(record: Any) -> None:
        record["message"] = scrub(record["message"])
        extra = record["extra"]
        for key, value in extra.items():
            if isinstance(value, str):
                extra[key] = scrub(value)
        if tracing.on:
            tracing.add_ids(extra)

    return patch


def setup(log_format: str = "text", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    psycopg_log = logging.getLogger("psycopg")
    psycopg_log.handlers = [_ToLoguru()]
    psycopg_log.propagate = False
    psycopg_log.setLevel(logging.WARNING)  # the pool's info records cost on every claim
    logger.remove()
    logger.configure(patcher=scrubbing(secrets))
    if log_format == "json":
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            backtrace=False,
            diagnose=False,
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "{message} <dim>{extra}</dim>",
        )
