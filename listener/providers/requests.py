"""A course request as each provider's API takes it, and its answer read back,
and an image request as OpenAI's Images API takes it: shared by the direct
calls (openai.py, anthropic.py) and the Batch APIs (batch_openai.py,
batch_anthropic.py), so that a batched job is asked exactly what a direct one
is (the prompts, the structured output, the prompt caching; the image's model,
size and format)."""

from __future__ import annotations

import json
from typing import Any

from listener.providers import pricing
from listener.providers.base import Answer, CoursePrompt, Refused, Usage, repair_request
from listener.providers.ratelimits import RateLimits

# Requests that share this key and their first 1,024+ tokens are routed to the same
# prompt cache: the system message (instructions) and the schema are the same for
# every course, and they come first.
PROMPT_CACHE_KEY = "ai-jobs-course-v1"
TOOL = "save_course"


def openai_course(model: str, max_tokens: int, prompt: CoursePrompt) -> dict[str, Any]:
    """The Chat Completions request (the keyword arguments of
    `chat.completions.create`, and a batch line's body)."""
    # The constant part first (instructions; the schema travels in response_format,
    # ahead of the messages), the request after it: OpenAI caches prompt prefixes.
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.user},
    ]
    if prompt.repair:
        previous, problem = prompt.repair
        messages.append({"role": "assistant", "content": previous})
        messages.append({"role": "user", "content": repair_request(problem)})
    return {
        "model": model,
        "messages": messages,
        "max_completion_tokens": max_tokens,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "course", "schema": prompt.schema, "strict": True},
        },
        "prompt_cache_key": PROMPT_CACHE_KEY,
    }


def openai_answer(resp: Any, model: str, limits: RateLimits, *, batch: bool = False) -> Answer:
    """A ChatCompletion read as an Answer (Refused for a refusal or a filtered
    answer); `batch`: priced at the Batch API's price."""
    model = resp.model or model
    usage = Usage()
    if resp.usage:
        details = resp.usage.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details else 0
        usage = Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens)
        usage.cached_input_tokens = cached
    choice = resp.choices[0] if resp.choices else None
    refusal = choice.message.refusal if choice is not None else None
    finish = choice.finish_reason if choice is not None else None
    openai_settle(usage, model, limits, refusal, finish, batch=batch)
    text = (choice.message.content or "") if choice else ""
    return Answer(text, model, usage, limits)


def openai_settle(
    usage: Usage,
    model: str,
    limits: RateLimits,
    refusal: str | None,
    finish: Any,
    *,
    batch: bool = False,
) -> None:
    """An OpenAI answer's cost into `usage` (at the Batch API's price for a
    batch), then Refused for a refusal or a filtered answer: what a streamed
    answer and a batch's answer share."""
    usage.cost_usd = pricing.token_cost(
        model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
    )
    if batch:
        usage.cost_usd = pricing.batch_price(usage.cost_usd)
    if refusal:
        raise Refused(refusal, usage, limits)
    if finish == "content_filter":
        raise Refused("blocked by the content filter", usage, limits)


def openai_image(model: str, prompt: str, size: str) -> dict[str, Any]:
    """The Images API request (the keyword arguments of `images.generate`, and a
    batch line's body): one image, as base64."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "size": size, "n": 1}
    if model.startswith("dall-e"):
        body["response_format"] = "b64_json"  # gpt-image models always answer base64
    return body


def anthropic_course(model: str, max_tokens: int, prompt: CoursePrompt) -> dict[str, Any]:
    """The Messages request (the keyword arguments of `messages.create`, and a
    batch request's params)."""
    messages: list[Any] = [{"role": "user", "content": prompt.user}]
    if prompt.repair:
        previous, problem = prompt.repair
        messages.append({"role": "assistant", "content": previous or "(no answer)"})
        messages.append({"role": "user", "content": repair_request(problem)})
    return {
        "model": model,
        "max_tokens": max_tokens,
        # The prompt cache covers the tools (the schema) and the system block up to
        # this breakpoint: the constant part of every course request.
        "system": [{"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}],
        "messages": messages,
        "tools": [
            {
                "name": TOOL,
                "description": "Save the generated course.",
                "input_schema": prompt.schema,
            }
        ],
        "tool_choice": {"type": "tool", "name": TOOL},
    }


def anthropic_answer(resp: Any, model: str, limits: RateLimits, *, batch: bool = False) -> Answer:
    """A Message read as an Answer (Refused for a refusal or an overflow)."""
    model = resp.model or model
    u = resp.usage
    usage = anthropic_usage(
        model,
        limits,
        (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens),
        resp.stop_reason,
        batch=batch,
    )
    text = ""
    for block in resp.content:
        if block.type == "tool_use" and block.name == TOOL:
            text = json.dumps(block.input)
            break
        if block.type == "text" and not text:
            text = block.text  # no tool call: let validation say what is wrong
    return Answer(text, model, usage, limits)


def anthropic_usage(
    model: str,
    limits: RateLimits,
    counts: tuple[int | None, int | None, int | None, int | None],
    stop: Any,
    *,
    batch: bool = False,
) -> Usage:
    """A Message's usage and cost from its counts (input, output, cache read,
    cache written; at the Batch API's price for a batch), then Refused for a
    refusal or an overflow: what a streamed answer and a batch's answer share."""
    inp, out, cached, written = (n or 0 for n in counts)
    # Anthropic's input_tokens leaves out the cached and cache-written ones.
    usage = Usage(inp + cached + written, out)
    usage.cached_input_tokens, usage.cache_write_tokens = cached, written
    usage.cost_usd = pricing.token_cost(
        model, usage.input_tokens, usage.output_tokens, cached, written
    )
    if batch:
        usage.cost_usd = pricing.batch_price(usage.cost_usd)
    if stop == "refusal":
        raise Refused("the model declined (stop_reason refusal)", usage, limits)
    if stop == "model_context_window_exceeded":
        raise Refused("context window exceeded", usage, limits)
    return usage
