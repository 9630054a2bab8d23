"""The incremental course reader (listener/course_stream.py): the same groups and
fields whatever the chunking, each group validated on its own, bad input never
raising, and work linear in the answer's size (counted, not timed)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from listener.course_schema import CourseParams
from listener.course_stream import CourseStream
from tests.fakeai.answers import course_from_prompt, sized

PARAMS = CourseParams(group_count=3, items_per_group=4)
TRICKY = 'Uni é中 😀 \\ "quoted" {not} [a, b] \\u00e9 : ,'


def course(size: int | None = None, **fields: Any) -> dict[str, Any]:
    c = course_from_prompt("Write a course on Tricky\nGroups: 3\nItems per group: 4\n")
    c = sized(c, size) if size else c
    c.update(fields)
    c["groups"][1]["items"][2]["explanation"] = TRICKY
    c["groups"][0]["title"] = 'Part {1} "one" \\ 😀'
    return c


def read(text: str, cuts: list[int], params: CourseParams | None = PARAMS) -> CourseStream:
    s = CourseStream(params)
    prev = 0
    for cut in [*sorted(set(cuts)), len(text)]:
        s.feed(text[prev:cut])
        prev = max(prev, cut)
    return s


def outcome(s: CourseStream) -> tuple[Any, ...]:
    return (s.groups, s.fields, s.rejected, s.done, s.broken)


def test_whole_answer_at_once() -> None:
    c = course(title=TRICKY)
    s = read(json.dumps(c, ensure_ascii=False), [])
    assert s.done and s.broken is None and s.rejected == 0
    assert s.groups == c["groups"]
    assert s.fields["title"] == TRICKY
    partial = s.partial("the-id", "the subject")
    assert partial is not None
    assert partial["id"] == "the-id" and partial["subject"] == "the subject"
    assert partial["groups"] == c["groups"] and partial["level"] == "beginner"


def test_every_chunk_size_and_both_encodings() -> None:
    c = course(title=TRICKY)
    for text in (json.dumps(c, ensure_ascii=False), json.dumps(c), json.dumps(c, indent=2)):
        whole = outcome(read(text, []))
        for step in (1, 2, 3, 5, 7, 64):
            assert outcome(read(text, list(range(step, len(text), step)))) == whole


def test_a_cut_at_every_position_gives_the_same_result() -> None:
    text = json.dumps(course(title=TRICKY), ensure_ascii=False)
    whole = outcome(read(text, []))
    for cut in range(len(text) + 1):
        assert outcome(read(text, [cut])) == whole, cut


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=60))
def test_any_chunking_gives_the_same_result(cuts: list[int]) -> None:
    text = json.dumps(course(title=TRICKY), ensure_ascii=False)
    assert outcome(read(text, cuts)) == outcome(read(text, []))


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40
    ),  # any text, escaped however json.dumps escapes it
    st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
    st.booleans(),
)
def test_any_string_content(content: str, cuts: list[int], ascii_only: bool) -> None:
    c = course(description=content)
    c["groups"][2]["summary"] = content
    text = json.dumps(c, ensure_ascii=ascii_only)
    s = read(text, cuts)
    assert s.fields["description"] == content
    assert [g["summary"] for g in s.groups][2] == content


def test_groups_appear_as_they_finish() -> None:
    c = course()
    text = json.dumps(c)
    s = CourseStream(PARAMS)
    seen = []
    for i in range(0, len(text), 10):
        s.feed(text[i : i + 10])
        seen.append(len(s.groups))
    assert seen == sorted(seen) and seen[-1] == 3
    # a group shows once its closing brace arrived, not before
    end = text.index("}]}", text.index('"g1-i4"')) + 3
    early = CourseStream(PARAMS)
    early.feed(text[: end - 1])
    assert early.groups == []
    assert 0.2 < early.fraction() < 1 / 3  # 3 of its 4 items counted, never a whole group
    early.feed(text[end - 1 : end])
    assert len(early.groups) == 1 and early.groups[0] == c["groups"][0]
    assert early.fraction() == 1 / 3


def test_a_group_not_valid_on_its_own_is_not_shown() -> None:
    c = course()
    c["groups"][1]["items"] = c["groups"][1]["items"][:2]  # 2 items, 4 asked for
    c["groups"][2]["title"] = "   "  # blank
    s = read(json.dumps(c), [])
    assert [g["id"] for g in s.groups] == ["g1"]
    assert s.rejected == 2


def test_garbage_never_raises() -> None:
    text = json.dumps(course())
    mid = len(text) // 2
    for junk in ('}}]]"', "{not json", "\\", '"', "]", "\x00\ufffd", "```json\n"):
        s = read(text[:mid] + junk + text[mid:], [mid, mid + 1])
        assert len(s.groups) <= 3
        assert all(g["items"] for g in s.groups)
    s = read("Sure! Here is your course: {not json", [5, 20])
    assert s.groups == [] and s.partial("x", "y") is None
    s = read("]" + text, [])
    assert s.groups == [] or s.broken is None  # text before the object is skipped
    assert read("", []).groups == []


def test_work_is_linear_in_the_answer() -> None:
    """Chunks of a 4,000-token answer (16,000 characters) at 1-4 tokens each: the
    work per chunk stays the same however long the prefix read."""
    text = json.dumps(course(size=4000))
    assert len(text) > 14000
    s = CourseStream(PARAMS)
    step = 7  # ~2 tokens a chunk
    costs = []  # (work of the chunk, whether it finished a group)
    for i in range(0, len(text), step):
        before = s.work
        ended = s.feed(text[i : i + step])
        costs.append((s.work - before, ended))
    assert len(s.groups) == 3 and s.done
    assert s.work <= 4 * len(text)  # each character examined once, kept values copied twice
    # past the course's short fields (each joined when it ends), a chunk costs its
    # own length (examined, then kept), however long the prefix; a group's end
    # costs the group's length once (joined and validated)
    head = (text.index('"groups"') + len('"groups": [')) // step + 1
    assert max(w for w, ended in costs[head:] if not ended) <= 2 * step
    assert sum(w for w, ended in costs if ended) <= 2 * len(text)
    # and twice the answer costs twice the work
    double = course(size=8000)
    big = CourseStream(PARAMS)
    big_text = json.dumps(double)
    for i in range(0, len(big_text), step):
        big.feed(big_text[i : i + step])
    assert big.work / len(big_text) <= 1.1 * s.work / len(text)
