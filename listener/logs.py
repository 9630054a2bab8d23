"""Logging setup: loguru to stderr, as text or one JSON object per line."""

from __future__ import annotations

import logging
import sys

from loguru import logger

from listener.errors import redact


class _ToLoguru(logging.Handler):
    """psycopg's and psycopg_pool's warnings (a failed connection attempt of the
    pool, one per retry during an outage) at debug level: the worker logs the
    outage itself, once, as a transition."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.bind(action="psycopg", logger=record.name).debug(redact(record.getMessage()))


def setup(log_format: str = "text", level: str = "INFO") -> None:
    psycopg_log = logging.getLogger("psycopg")
    psycopg_log.handlers = [_ToLoguru()]
    psycopg_log.propagate = False
    psycopg_log.setLevel(logging.WARNING)  # the pool's info records cost on every claim
    logger.remove()
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
