"""Anthropic's SDK, imported in a thread at its first use: what waits on it."""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
import types
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from listener.batches.collect import Answered
from listener.providers import anthropic as anthropic_provider
from listener.providers.anthropic import AnthropicProvider
from listener.providers.batch_anthropic import AnthropicBatches
from listener.settings import Settings


async def test_a_batch_send_cancelled_while_the_sdk_loads_ends_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the import runs, the module is in sys.modules without its errors: a
    cancellation then must not turn into an AttributeError from naming one (the
    batch watch would count it as a failed send)."""
    entered, release = threading.Event(), threading.Event()

    def import_module(name: str) -> Any:
        entered.set()
        release.wait(10)
        return importlib.import_module(name)

    monkeypatch.setattr(
        anthropic_provider, "importlib", SimpleNamespace(import_module=import_module)
    )
    monkeypatch.setitem(sys.modules, "anthropic", types.ModuleType("anthropic"))
    provider = AnthropicProvider(Settings(anthropic_api_key="sk-ant-test"))
    send = asyncio.create_task(AnthropicBatches(provider).submit(uuid.uuid4(), [], lambda _: None))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
    finally:
        release.set()


async def test_a_provider_answered_by_a_batch_is_made_ready_as_the_real_one() -> None:
    """The chain makes a provider's client before it times the call; a batch's
    wrapper (whose repair round calls the real provider) passes that on."""
    provider = AnthropicProvider(Settings(anthropic_api_key="sk-ant-test"))
    client = await Answered(provider).ready()
    assert client is not None and client is provider.client
