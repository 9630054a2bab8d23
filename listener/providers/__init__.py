"""The providers this process may ask, in order: those of AI_PROVIDER_PRIORITY
whose key is set, then the placeholder when ALLOW_PLACEHOLDER=1. One SDK client
each, shared by every job and closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field

from listener.errors import GenerationError
from listener.providers.base import CourseProvider, MediaProvider
from listener.providers.placeholder import PlaceholderProvider
from listener.settings import Settings

NO_PROVIDER = (
    "No AI provider configured: set OPENAI_API_KEY or ANTHROPIC_API_KEY (or ALLOW_PLACEHOLDER=1)"
)


def configured(settings: Settings) -> list[str]:
    """The providers this process would ask, without making their clients."""
    keys = {"openai": settings.openai_api_key, "anthropic": settings.anthropic_api_key}
    names = [n for n in settings.provider_order if keys.get(n)]
    return names + (["placeholder"] if settings.allow_placeholder else [])


@dataclass
class Providers:
    course: list[CourseProvider] = field(default_factory=list)
    media: list[MediaProvider] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # named in the priority, key not set

    @classmethod
    def from_settings(cls, settings: Settings) -> Providers:
        found = cls()
        for name in settings.provider_order:
            if name == "openai" and settings.openai_api_key:
                from listener.providers.openai import OpenAIProvider

                openai_provider = OpenAIProvider(settings)
                found.course.append(openai_provider)
                found.media.append(openai_provider)  # the only one with images and speech
            elif name == "anthropic" and settings.anthropic_api_key:
                from listener.providers.anthropic import AnthropicProvider

                found.course.append(AnthropicProvider(settings))
            else:
                found.skipped.append(name)
        if settings.allow_placeholder:
            placeholder = PlaceholderProvider(settings.placeholder_delay_ms)
            found.course.append(placeholder)
            found.media.append(placeholder)
        return found

    def course_chain(self) -> list[CourseProvider]:
        if not self.course:
            raise GenerationError(f"Course generation failed: {NO_PROVIDER}")
        return self.course

    def media_chain(self) -> list[MediaProvider]:
        if not self.media:
            why = NO_PROVIDER
            if self.course:  # only Anthropic: it makes no images or speech
                why = "no configured provider makes media (set OPENAI_API_KEY or ALLOW_PLACEHOLDER)"
            raise GenerationError(f"Media generation failed: {why}")
        return self.media

    async def aclose(self) -> None:
        for p in self.course:
            await p.aclose()
