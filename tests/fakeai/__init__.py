"""The fake OpenAI + Anthropic API the tests and benchmarks talk to.

fake.py answers (its docstring lists the modes), answers.py makes the courses, the
pace and the streamed events, quota.py the rate limits and their headers, http.py
the server. `python -m tests.fakeai --help` runs it as its own process.
"""

from tests.fakeai.answers import Pace, course_from_prompt
from tests.fakeai.fake import (
    FAKE_ANTHROPIC_KEY,
    FAKE_IMAGE,
    FAKE_MP3,
    FAKE_OPENAI_KEY,
    FakeAI,
    Recorded,
    running,
)
from tests.fakeai.http import HTTPFake, QuietServer
from tests.fakeai.quota import Limited, Limits

__all__ = [
    "FAKE_ANTHROPIC_KEY",
    "FAKE_IMAGE",
    "FAKE_MP3",
    "FAKE_OPENAI_KEY",
    "FakeAI",
    "HTTPFake",
    "Limited",
    "Limits",
    "Pace",
    "QuietServer",
    "Recorded",
    "course_from_prompt",
    "running",
]
