"""What a course is (the pydantic `Course`, published as docs/course.schema.json)
and what a course author may ask for (`CourseParams`, the job's `params`).

The JSON schema sent to the providers is generated from `Course`, so the model, the
published file and what the providers are held to never drift apart (a test keeps
docs/course.schema.json equal to `course_json_schema()`).

Regenerate the published file with `python -m listener.course_schema > docs/course.schema.json`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

SCHEMA_VERSION = 1
Level = Literal["beginner", "intermediate", "advanced"]
ItemType = Literal["flashcard", "multiple_choice", "mixed"]


def _non_blank(v: str) -> str:
    # A validator rather than min_length: OpenAI's strict structured output rejects
    # string length keywords, and the schema we publish is the one we send.
    if not v.strip():
        raise ValueError("must not be blank")
    return v.strip()


Text = Annotated[str, AfterValidator(_non_blank)]


class _Strict(BaseModel):
    # Every field required and no extra keys: what strict structured output demands.
    model_config = ConfigDict(extra="forbid")


class Item(_Strict):
    """One thing to learn: a flashcard (options empty) or a multiple-choice question."""

    id: Text = Field(description="Stable id within the course, e.g. 'g1-i3'")
    prompt: Text = Field(description="The question or the term to recall")
    answer: Text = Field(description="The correct answer")
    explanation: str = Field(description="Why the answer is right, in one or two sentences")
    options: list[str] = Field(
        description="Multiple-choice options including the answer; empty for a flashcard"
    )


class Group(_Strict):
    """A lesson: a titled group of items on one theme."""

    id: Text = Field(description="Stable id within the course, e.g. 'g1'")
    title: Text
    summary: str = Field(description="What this group teaches, in one sentence")
    items: list[Item] = Field(min_length=1)


class Course(_Strict):
    """A generated course: groups of items on one subject."""

    id: Text = Field(description="The course id (slug)")
    title: Text
    subject: Text
    description: str
    level: Level
    language: Text = Field(description="The language the course is written in")
    groups: list[Group] = Field(min_length=1)

    @property
    def item_count(self) -> int:
        return sum(len(g.items) for g in self.groups)


class CourseParams(BaseModel):
    """The options of a course job (`ai_course_jobs.params`), camelCase as stored."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )

    items_per_group: int = Field(12, ge=1, le=50, strict=True)
    group_count: int = Field(3, ge=1, le=20, strict=True)
    level: Level = "beginner"
    language: str = Field("English", min_length=1, max_length=40)
    audience: str | None = Field(None, max_length=200)
    item_type: ItemType = "flashcard"
    instructions: str | None = Field(None, max_length=1000)
    # Demos and tests: the placeholder provider fails with this message (real
    # providers ignore it), to show retries ending in the dead letter.
    simulate_failure: str | None = Field(None, max_length=200)

    def normalized(self) -> dict[str, Any]:
        """The params as they shape the result (defaults filled, text folded)."""
        data = self.model_dump(by_alias=True)
        for key in ("language", "audience", "instructions"):
            if isinstance(data[key], str):
                data[key] = " ".join(data[key].casefold().split())
        return data


def course_json_schema() -> dict[str, Any]:
    return Course.model_json_schema()


def parse_course(text: str, expected: CourseParams | None = None) -> Course:
    """Validate a provider's answer; SchemaValidationError says what is wrong."""
    try:
        course = Course.model_validate_json(text)
    except ValidationError as exc:
        raise SchemaValidationError(_summarize(exc)) from None
    if expected is not None:
        problems = []
        if len(course.groups) != expected.group_count:
            problems.append(f"{len(course.groups)} groups, expected {expected.group_count}")
        for n, group in enumerate(course.groups, 1):
            if len(group.items) != expected.items_per_group:
                problems.append(
                    f"group {n} has {len(group.items)} items, expected {expected.items_per_group}"
                )
        if problems:
            raise SchemaValidationError("; ".join(problems[:3]))
    return course


class SchemaValidationError(ValueError):
    """The answer is not a valid course."""

    def __str__(self) -> str:
        return f"Schema validation failed: {self.args[0]}"


def _summarize(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "answer"
        parts.append(f"{where}: {err['msg']}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


if __name__ == "__main__":
    print(json.dumps(course_json_schema(), indent=2))
