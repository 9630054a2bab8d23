"""A test hook, for the crash tests only: with AI_JOBS_TEST_CRASH_AT=<moment> in
its environment, the process ends at once (os._exit, as a SIGKILL would end it:
nothing flushed, nothing released) when its batch work reaches that moment
(docs/testing.md). Moments: before_upload, after_upload, after_create,
reading_results. Unset (always, outside tests), it does nothing."""

from __future__ import annotations

import os

ENV = "AI_JOBS_TEST_CRASH_AT"
MOMENTS = ("before_upload", "after_upload", "after_create", "reading_results")
EXIT_CODE = 86


def crash_point(moment: str) -> None:
    if os.environ.get(ENV) == moment:
        os._exit(EXIT_CODE)
