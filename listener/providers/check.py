"""`ai-jobs check-providers`: one cheap authenticated call (the models list) per
configured provider, as the runbook's curl checks do."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from listener.providers.base import CourseProvider, describe
from listener.settings import PROVIDERS, Settings


@dataclass
class Check:
    provider: str
    model: str
    status: str  # ok | failed | not configured
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _make(name: str, settings: Settings) -> CourseProvider | None:
    if name == "openai" and settings.openai_api_key:
        from listener.providers.openai import OpenAIProvider

        return OpenAIProvider(settings)
    if name == "anthropic" and settings.anthropic_api_key:
        from listener.providers.anthropic import AnthropicProvider

        provider = AnthropicProvider(settings)
        _ = provider.client  # its SDK imported now (at its first use), not in the timed call
        return provider
    return None


async def _one(name: str, provider: CourseProvider | None, settings: Settings) -> Check:
    if provider is None:
        return Check(name, "", "not configured", f"{name.upper()}_API_KEY not set")
    try:
        async with asyncio.timeout(settings.ai_timeout_seconds):
            detail = await provider.check()
        return Check(name, provider.model, "ok", detail)
    except Exception as exc:
        cause = describe(exc, settings.ai_timeout_seconds, settings.secrets())
        return Check(name, provider.model, "failed", cause)
    finally:
        await provider.aclose()


async def check_providers(settings: Settings) -> list[Check]:
    order = settings.provider_order + [p for p in PROVIDERS if p not in settings.provider_order]
    # Clients first (importing an SDK blocks the loop for a while), then the timed calls.
    providers = [(name, _make(name, settings)) for name in order]
    checks = list(await asyncio.gather(*(_one(n, p, settings) for n, p in providers)))
    for c in checks:
        if c.provider not in settings.provider_order and c.status != "not configured":
            c.detail += " (not in AI_PROVIDER_PRIORITY: never asked)"
    if settings.allow_placeholder:
        checks.append(Check("placeholder", "placeholder", "ok", "no network needed"))
    return checks
