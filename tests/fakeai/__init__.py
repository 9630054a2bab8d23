"""The fake OpenAI + Anthropic API the tests and benchmarks talk to (see fake.py)."""

from tests.fakeai.fake import (
    FAKE_ANTHROPIC_KEY,
    FAKE_IMAGE,
    FAKE_MP3,
    FAKE_OPENAI_KEY,
    FakeAI,
    HTTPFake,
    QuietServer,
    Recorded,
    course_from_prompt,
    running,
)

__all__ = [
    "FAKE_ANTHROPIC_KEY",
    "FAKE_IMAGE",
    "FAKE_MP3",
    "FAKE_OPENAI_KEY",
    "FakeAI",
    "HTTPFake",
    "QuietServer",
    "Recorded",
    "course_from_prompt",
    "running",
]
