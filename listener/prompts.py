"""The course prompt: what the model is asked, built from the subject and params."""

from __future__ import annotations

from listener.course_schema import CourseParams, course_json_schema
from listener.providers.base import CoursePrompt

SYSTEM = (
    "You are an expert course author. You write accurate, well-sequenced learning "
    "material for self-study: each group is a short lesson on one theme, ordered from "
    "foundations to harder ideas, and each item tests one fact or skill. Answers are "
    "correct and unambiguous; explanations are brief and teach why. You answer with the "
    "course as JSON matching the given schema, and nothing else."
)

_ITEM_TYPES = {
    "flashcard": "flashcards (a prompt and its answer; options empty)",
    "multiple_choice": (
        "multiple-choice questions (3 to 5 options, exactly one of them equal to the answer)"
    ),
    "mixed": "a mix of flashcards (options empty) and multiple-choice questions",
}


def course_prompt(subject: str, course_id: str, params: CourseParams) -> CoursePrompt:
    lines = [
        f"Write a course on: {subject}",
        f"Course id: {course_id}",
        f"Level: {params.level}",
        f"Language: {params.language} (every title, item and explanation in this language)",
        f"Groups: {params.group_count}",
        f"Items per group: {params.items_per_group}",
        f"Item type: {_ITEM_TYPES[params.item_type]}",
    ]
    if params.audience:
        lines.append(f"Audience: {params.audience}")
    if params.instructions:
        lines.append(f"Author's instructions: {params.instructions}")
    lines.append(
        f"Use ids g1..g{params.group_count} for groups and g<group>-i<item> for items. "
        f"Every group must have exactly {params.items_per_group} items."
    )
    return CoursePrompt(
        system=SYSTEM,
        user="\n".join(lines),
        schema=course_json_schema(),
        subject=subject,
        course_id=course_id,
        params=params,
    )
