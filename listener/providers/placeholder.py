"""The placeholder provider (ALLOW_PLACEHOLDER=1): deterministic courses, PNG
images and WAV sounds made locally, after PLACEHOLDER_DELAY_MS, with no network.
For demos, load tests, and an emergency switch while every provider is down."""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import struct
import wave
import zlib

from listener.course_schema import Course, Group, Item
from listener.errors import GenerationError
from listener.providers.base import Answer, CoursePrompt, Media, TextSink, Usage

MODEL = "placeholder"


class PlaceholderProvider:
    name = "placeholder"
    model = MODEL

    def __init__(self, delay_ms: int = 0) -> None:
        self.delay = delay_ms / 1000

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        await asyncio.sleep(self.delay)
        if prompt.params.simulate_failure:
            raise GenerationError(prompt.params.simulate_failure)
        text = placeholder_course(prompt).model_dump_json()
        if sink is not None:
            sink(text)  # all at once: made locally, nothing streams
        return Answer(text, MODEL, Usage())

    def media_model(self, media_type: str) -> str:
        return MODEL

    async def image(self, prompt: str, size: str) -> Media:
        await asyncio.sleep(self.delay)
        return Media(placeholder_png(prompt), "png", "image/png", MODEL, Usage())

    async def speech(self, text: str, voice: str, fmt: str) -> Media:
        await asyncio.sleep(self.delay)
        return Media(placeholder_wav(text), "wav", "audio/wav", MODEL, Usage())

    async def check(self) -> str:
        return "no network needed"

    async def aclose(self) -> None:
        return None


def placeholder_course(prompt: CoursePrompt) -> Course:
    p = prompt.params
    groups = []
    for g in range(1, p.group_count + 1):
        items = []
        for i in range(1, p.items_per_group + 1):
            options = []
            if p.item_type == "multiple_choice" or (p.item_type == "mixed" and i % 2 == 0):
                options = [f"Answer {g}.{i}", f"Distractor {g}.{i}a", f"Distractor {g}.{i}b"]
            items.append(
                Item(
                    id=f"g{g}-i{i}",
                    prompt=f"{prompt.subject}: question {i} of part {g}",
                    answer=f"Answer {g}.{i}",
                    explanation=f"A placeholder explanation for question {i} of part {g}.",
                    options=options,
                )
            )
        groups.append(
            Group(
                id=f"g{g}",
                title=f"{prompt.subject}, part {g}",
                summary=f"Part {g} of a placeholder course on {prompt.subject}.",
                items=items,
            )
        )
    return Course(
        id=prompt.course_id,
        title=prompt.subject,
        subject=prompt.subject,
        description=f"A placeholder {p.level} course on {prompt.subject}.",
        level=p.level,
        language=p.language,
        groups=groups,
    )


def _seed(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def placeholder_png(prompt: str, size: int = 64) -> bytes:
    """A size x size PNG in a colour drawn from the prompt, with a diagonal stripe."""
    r, g, b = _seed(prompt)[:3]
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            row += bytes((255 - r, 255 - g, 255 - b)) if abs(x - y) < 4 else bytes((r, g, b))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def placeholder_wav(text: str, seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A short 16-bit mono tone whose pitch is drawn from the text."""
    freq = 220 + _seed(text)[0] * 2
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * n / rate)))
        for n in range(int(seconds * rate))
    )
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()
