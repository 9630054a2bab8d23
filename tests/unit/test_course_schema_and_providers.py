"""The course schema, its published copy, params, the cache key, the prompt, error
descriptions and cost estimates: no database, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from listener.course_schema import (
    Course,
    CourseParams,
    SchemaValidationError,
    course_json_schema,
    parse_course,
)
from listener.handlers.course import cache_key, normalize_subject
from listener.prompts import course_prompt
from listener.providers import pricing
from listener.providers.base import describe, scrub
from listener.providers.placeholder import placeholder_course, placeholder_png

ROOT = Path(__file__).resolve().parents[2]


def test_published_schema_is_generated_from_the_model() -> None:
    published = json.loads((ROOT / "docs/course.schema.json").read_text())
    assert published == course_json_schema(), (
        "docs/course.schema.json is stale: "
        "python -m listener.course_schema > docs/course.schema.json"
    )


def test_schema_suits_strict_structured_output() -> None:
    # OpenAI's strict mode: every object closed and every property required.
    schema = course_json_schema()
    objects = [schema, *schema["$defs"].values()]
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])


def test_params_defaults_and_limits() -> None:
    p = CourseParams.model_validate({})
    assert (p.items_per_group, p.group_count, p.level, p.language) == (12, 3, "beginner", "English")
    assert CourseParams.model_validate({"itemsPerGroup": 50}).items_per_group == 50
    for bad in ({"itemsPerGroup": 0}, {"itemsPerGroup": 51}, {"itemsPerGroup": 2.5}, {"x": 1}):
        with pytest.raises(ValueError):
            CourseParams.model_validate(bad)


def _prompt(subject: str = "Algebra", **params: object) -> Course:
    return placeholder_course(
        course_prompt(subject, "algebra", CourseParams.model_validate(params))
    )


def test_parse_course_checks_the_shape_and_the_counts() -> None:
    params = CourseParams.model_validate({"itemsPerGroup": 2, "groupCount": 2})
    good = _prompt(itemsPerGroup=2, groupCount=2)
    assert parse_course(good.model_dump_json(), params) == good
    with pytest.raises(SchemaValidationError) as err:
        parse_course(good.model_dump_json(), CourseParams.model_validate({"itemsPerGroup": 3}))
    assert str(err.value) == (
        "Schema validation failed: 2 groups, expected 3; group 1 has 2 items, expected 3; "
        "group 2 has 2 items, expected 3"
    )
    with pytest.raises(SchemaValidationError, match="answer: Invalid JSON"):
        parse_course("not json")
    blank = good.model_dump()
    blank["title"] = "   "
    with pytest.raises(SchemaValidationError, match="title: Value error, must not be blank"):
        parse_course(json.dumps(blank))


def test_cache_key_folds_spelling_not_meaning() -> None:
    p = CourseParams.model_validate({"itemsPerGroup": 6})
    assert normalize_subject("  Algebra   BASICS! ") == "algebra basics"
    assert cache_key("Algebra Basics", p) == cache_key(" algebra  basics ", p)
    assert cache_key("Algebra Basics", p) == cache_key(
        "Algebra Basics", CourseParams.model_validate({"itemsPerGroup": 6, "level": "beginner"})
    )
    assert cache_key("Algebra Basics", p) != cache_key("Algebra", p)
    assert cache_key("Algebra Basics", p) != cache_key(
        "Algebra Basics", CourseParams.model_validate({"itemsPerGroup": 7})
    )


def test_prompt_says_what_the_author_asked() -> None:
    p = CourseParams.model_validate(
        {"itemsPerGroup": 5, "level": "advanced", "language": "German", "audience": "nurses"}
    )
    prompt = course_prompt("Pharmacology", "pharmacology", p)
    for text in ("Pharmacology", "Items per group: 5", "Level: advanced", "German", "nurses"):
        assert text in prompt.user
    assert prompt.schema == course_json_schema()


def test_scrub_and_describe_hide_keys() -> None:
    key = "sk-proj-abcdefghijklmnop1234"
    assert scrub(f"Incorrect API key provided: {key}.", []) == "Incorrect API key provided: ***."
    assert scrub("token=s3cr3t-value", ["s3cr3t-value"]) == "token=***"
    assert describe(TimeoutError(), 50, []) == "timeout after 50s"
    assert describe(ValueError(f"bad {key}"), 50, []) == "ValueError: bad ***"


def test_cost_estimates() -> None:
    assert pricing.token_cost("gpt-4.1-mini-2025-04-14", 1_000_000, 0) == 0.40
    assert pricing.token_cost("gpt-4.1", 0, 1_000_000) == 8.0  # not gpt-4.1-mini's price
    assert pricing.token_cost("some-new-model", 10, 10) is None
    assert pricing.image_cost("gpt-image-1") == 0.042


def test_placeholder_is_deterministic() -> None:
    assert _prompt("Knots", itemsPerGroup=3) == _prompt("Knots", itemsPerGroup=3)
    assert placeholder_png("a") == placeholder_png("a") != placeholder_png("b")
