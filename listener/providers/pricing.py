"""Estimated cost of a call, from list prices in USD.

Where the prices come from: the providers' public price pages (openai.com/api/pricing,
anthropic.com/pricing), standard tier, as of the date in PRICES_AS_OF. Estimates only
(prices change; the provider's invoice is the truth). A model not listed gives no
estimate (`estimatedCostUsd: null`) rather than a wrong one. Prices match a model by
the longest listed prefix, so dated snapshots (`gpt-4.1-mini-2025-04-14`) find their
family.

PRICING_OVERRIDES replaces or adds prices without a release: a JSON object, inline
or in a file (the setting holds its path), keyed by model prefix:

    {"gpt-4.1-mini": {"input": 0.40, "cachedInput": 0.10, "output": 1.60},
     "my-finetune":  {"input": 3.0, "output": 12.0},
     "gpt-image-1":  {"image": 0.042},
     "tts-1":        {"speechPerMillionChars": 15.0}}

Token prices are USD per million tokens; `cachedInput` (a prompt-cache read) defaults
to the input price, `cacheWrite` (Anthropic's cache write) to 1.25 x input for Claude
models and to the input price otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from listener.errors import ConfigError

T = TypeVar("T")
PRICES_AS_OF = "2025-10"
ANTHROPIC_CACHE_WRITE = 1.25  # x input: writing a 5-minute prompt cache entry


@dataclass(frozen=True)
class TokenPrice:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float
    cache_write: float | None = None  # None: the input price

    def cost(self, input_tokens: int, cached: int, cache_write: int, output: int) -> float:
        fresh = max(0, input_tokens - cached - cache_write)
        write = self.cache_write if self.cache_write is not None else self.input
        total = (
            fresh * self.input
            + cached * self.cached_input
            + cache_write * write
            + output * self.output
        )
        return round(total / 1_000_000, 6)


def _claude(inp: float, out: float) -> TokenPrice:
    return TokenPrice(inp, round(inp * 0.1, 4), out, round(inp * ANTHROPIC_CACHE_WRITE, 4))


_BUILT_IN_TOKENS: dict[str, TokenPrice] = {
    "gpt-4.1-nano": TokenPrice(0.10, 0.025, 0.40),
    "gpt-4.1-mini": TokenPrice(0.40, 0.10, 1.60),
    "gpt-4.1": TokenPrice(2.00, 0.50, 8.00),
    "gpt-4o-mini": TokenPrice(0.15, 0.075, 0.60),
    "gpt-4o": TokenPrice(2.50, 1.25, 10.00),
    "claude-haiku-4-5": _claude(1.00, 5.00),
    "claude-3-5-haiku": _claude(0.80, 4.00),
    "claude-sonnet-4": _claude(3.00, 15.00),
    "claude-3-5-sonnet": _claude(3.00, 15.00),
    "claude-opus-4": _claude(15.00, 75.00),
    "placeholder": TokenPrice(0.0, 0.0, 0.0),
}
# model prefix: USD per generated image (standard quality, 1024x1024)
_BUILT_IN_IMAGES: dict[str, float] = {"gpt-image-1": 0.042, "dall-e-3": 0.04, "placeholder": 0.0}
# model prefix: USD per million characters of speech input
_BUILT_IN_SPEECH: dict[str, float] = {"gpt-4o-mini-tts": 12.0, "tts-1": 15.0, "placeholder": 0.0}

TOKEN_PRICES: dict[str, TokenPrice] = dict(_BUILT_IN_TOKENS)
IMAGE_PRICES: dict[str, float] = dict(_BUILT_IN_IMAGES)
SPEECH_PRICES: dict[str, float] = dict(_BUILT_IN_SPEECH)


def _lookup(table: dict[str, T], model: str) -> T | None:
    matches = [k for k in table if model.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def token_cost(
    model: str, input_tokens: int, output_tokens: int, cached: int = 0, cache_write: int = 0
) -> float | None:
    """`input_tokens` counts every input token, the cached and cache-written ones too."""
    price = _lookup(TOKEN_PRICES, model)
    if price is None:
        return None
    return price.cost(input_tokens, cached, cache_write, output_tokens)


BATCH_DISCOUNT = 0.5  # the Batch APIs (OpenAI Batch, Anthropic Message Batches): half price


def batch_price(cost: float | None) -> float | None:
    """A call's cost when it went through a provider's Batch API."""
    return None if cost is None else round(cost * BATCH_DISCOUNT, 6)


def image_cost(model: str) -> float | None:
    return _lookup(IMAGE_PRICES, model)


def speech_cost(model: str, characters: int) -> float | None:
    price = _lookup(SPEECH_PRICES, model)
    return None if price is None else round(characters * price / 1_000_000, 6)


def model_label(model: str | None, known: set[str]) -> str:
    """A bounded label for /metrics: the model when configured, else its priced
    family, else "other" (a provider may answer with any snapshot name)."""
    if not model:
        return "other"
    if model in known:
        return model
    for table in (TOKEN_PRICES, IMAGE_PRICES, SPEECH_PRICES):
        matches = [k for k in table if model.startswith(k)]
        if matches:
            return max(matches, key=len)
    return "other"


def configure(overrides: str | None) -> None:
    """Apply PRICING_OVERRIDES over the built-in prices (ConfigError if malformed)."""
    TOKEN_PRICES.clear()
    TOKEN_PRICES.update(_BUILT_IN_TOKENS)
    IMAGE_PRICES.clear()
    IMAGE_PRICES.update(_BUILT_IN_IMAGES)
    SPEECH_PRICES.clear()
    SPEECH_PRICES.update(_BUILT_IN_SPEECH)
    if not overrides or not overrides.strip():
        return
    for prefix, entry in _load(overrides).items():
        _apply(prefix, entry)


def _load(text: str) -> dict[str, Any]:
    source = "PRICING_OVERRIDES"
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text.strip()).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"Invalid setting PRICING_OVERRIDES: cannot read {path}: {exc.strerror}"
            ) from None
        source = str(path)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"Invalid setting PRICING_OVERRIDES: {source} is not JSON ({exc})"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError("Invalid setting PRICING_OVERRIDES: expected a JSON object by model")
    return doc


_TOKEN_KEYS = {"input", "cachedInput", "output", "cacheWrite"}


def _apply(prefix: str, entry: Any) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"Invalid setting PRICING_OVERRIDES: {prefix}: {why}")

    if not isinstance(entry, dict) or not entry:
        raise bad("expected an object of prices")
    unknown = set(entry) - _TOKEN_KEYS - {"image", "speechPerMillionChars"}
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)}")
    for k, v in entry.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise bad(f"{k} must be a number >= 0")
    if "image" in entry:
        IMAGE_PRICES[prefix] = float(entry["image"])
    if "speechPerMillionChars" in entry:
        SPEECH_PRICES[prefix] = float(entry["speechPerMillionChars"])
    if _TOKEN_KEYS & set(entry):
        base = TOKEN_PRICES.get(prefix)
        if base is None:
            if "input" not in entry or "output" not in entry:
                raise bad("a new model needs input and output prices")
            base = TokenPrice(entry["input"], entry["input"], entry["output"])
        TOKEN_PRICES[prefix] = replace(
            base,
            input=float(entry.get("input", base.input)),
            cached_input=float(entry.get("cachedInput", base.cached_input)),
            output=float(entry.get("output", base.output)),
            cache_write=float(entry["cacheWrite"]) if "cacheWrite" in entry else base.cache_write,
        )
