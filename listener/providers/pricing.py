"""Estimated cost of a call, from list prices in USD per million tokens.

Estimates only (prices change; the provider's invoice is the truth). A model not
listed here gives no estimate (`estimatedCostUsd: null`) rather than a wrong one.
Prices match a model by the longest listed prefix, so dated snapshots
(`gpt-4.1-mini-2025-04-14`) find their family.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

# model prefix: (input, output) USD per 1M tokens
TOKEN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    "placeholder": (0.0, 0.0),
}

# model prefix: USD per generated image (standard quality, 1024x1024)
IMAGE_PRICES: dict[str, float] = {"gpt-image-1": 0.042, "dall-e-3": 0.04, "placeholder": 0.0}
# model prefix: USD per million characters of speech input
SPEECH_PRICES: dict[str, float] = {"gpt-4o-mini-tts": 12.0, "tts-1": 15.0, "placeholder": 0.0}


def _lookup(table: dict[str, T], model: str) -> T | None:
    matches = [k for k in table if model.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def token_cost(model: str, input_tokens: int, output_tokens: int) -> float | None:
    price = _lookup(TOKEN_PRICES, model)
    if price is None:
        return None
    return round((input_tokens * price[0] + output_tokens * price[1]) / 1_000_000, 6)


def image_cost(model: str) -> float | None:
    return _lookup(IMAGE_PRICES, model)


def speech_cost(model: str, characters: int) -> float | None:
    price = _lookup(SPEECH_PRICES, model)
    return None if price is None else round(characters * price / 1_000_000, 6)
