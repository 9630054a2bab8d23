"""parse_payload against anything the channel can carry: one of docs/reference.md's
shapes, or a ValueError with a reason; the listener's dispatch never raises."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listener.notifications import (
    MAX_PAYLOAD,
    SWEEP_NUDGE_SPACING,
    Listener,
    Nudge,
    parse_payload,
)

JOB = uuid.UUID("0b9f7c1e-8a4f-4b8e-9a51-6f2b9c1d2e3f")
NOTIFY_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=2000)


@pytest.mark.parametrize(
    ("payload", "nudge"),
    [
        ("", Nudge(sweep=True)),
        ("  ", Nudge(sweep=True)),
        (str(JOB), Nudge(job_id=JOB)),
        ('{"table": "ai_media_jobs"}', Nudge(table="ai_media_jobs")),
        ('{"table": "ai_course_jobs", "count": 5000}', Nudge(table="ai_course_jobs")),
    ],
)
def test_the_shapes_of_the_interface(payload: str, nudge: Nudge) -> None:
    assert parse_payload(payload) == nudge


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 7000,
        "{" * 400,
        '{"table": ' * 100,
        json.dumps({"table": ["ai_course_jobs"]}),
        json.dumps({"table": {"a": 1}}),
        json.dumps({"table": "ai_course_jobs", "id": 1}),
        json.dumps({"table": "ai_course_jobs", "id": "nope"}),
        "x" * (MAX_PAYLOAD + 1),
        "null",
        "1e999",
    ],
)
def test_anything_else_is_a_value_error(payload: str) -> None:
    with pytest.raises(ValueError):
        parse_payload(payload)


@settings(max_examples=500, deadline=None, database=None)
@given(
    NOTIFY_TEXT
    | st.recursive(
        st.none() | st.integers() | NOTIFY_TEXT,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NOTIFY_TEXT, inner, max_size=3),
    ).map(json.dumps)
)
def test_any_text_is_a_nudge_or_a_value_error(payload: str) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(parse_payload(payload), Nudge)


def test_dispatch_survives_a_failing_nudge_handler() -> None:
    def boom(nudge: Nudge) -> None:
        raise RuntimeError("handler bug")

    listener = Listener("", boom, lambda recovered: None)
    listener._dispatch("")  # the handler raises: logged, not raised
    listener._dispatch("[" * 7000)


def test_a_flood_of_sweep_requests_is_one_sweep_a_second() -> None:
    got: list[Nudge] = []
    listener = Listener("", got.append, lambda recovered: None)
    for _ in range(1000):
        listener._dispatch("")
    assert [n.sweep for n in got].count(True) == 1
    assert len(got) == 1000  # the others still look for work
    listener._last_sweep_nudge -= SWEEP_NUDGE_SPACING  # a second later
    listener._dispatch("")
    assert got[-1].sweep
