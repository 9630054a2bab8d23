"""A job's params, read by the model its handler uses: the worker reads them so
when it runs the job, `ai-jobs enqueue` before the insert (the one source of
what a handler accepts; a job the worker would refuse is refused at once)."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from listener.course_schema import CourseParams
from listener.errors import InvalidJob


class MediaParams(BaseModel):
    """The options of a media job (`ai_media_jobs.params`)."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    size: str = Field("1024x1024", pattern=r"^(auto|\d{2,4}x\d{2,4})$")
    voice: str | None = Field(None, min_length=1, max_length=40)
    format: Literal["mp3", "wav", "opus", "aac", "flac"] = "mp3"


MODELS: dict[str, type[BaseModel]] = {"course": CourseParams, "media": MediaParams}
M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], raw: dict[str, Any]) -> M:
    """The params as the handler reads them; InvalidJob names the first problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "params"
        raise InvalidJob(f"Invalid job params: {where}: {err['msg']}") from None


def check(job_type: str, raw: dict[str, Any]) -> None:
    """Raise InvalidJob if a job of this type (course, media) could not run with them."""
    parse(MODELS[job_type], raw)
