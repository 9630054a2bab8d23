"""Logging setup: loguru to stderr, as text or one JSON object per line."""

from __future__ import annotations

import sys

from loguru import logger


def setup(log_format: str = "text", level: str = "INFO") -> None:
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
