"""The media handler (OpenAI images and speech, the placeholder's PNG and WAV), and
storage: the local folder and Supabase Storage against a local fake of its API."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import struct
import wave
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener.catalog import CATALOG_PATH
from listener.errors import ConfigError, GenerationError, InvalidJob, ProvidersUnavailable
from listener.handlers import create_runtime
from listener.settings import Settings
from listener.storage import LocalStorage, StorageError, open_storage
from tests.fakeai import FAKE_IMAGE, FAKE_MP3, FakeAI
from tests.fakesupabase import FAKE_SERVICE_KEY, FakeSupabase
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job, media_job

pytestmark = pytest.mark.timeout(30)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_image_and_audio_from_openai_to_storage(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings()
    rt = await create_runtime(s, pool)
    image = await media_job(conn, "a lighthouse at dusk", "image", params={"size": "512x512"})
    audio = await media_job(conn, "Bonjour tout le monde", "audio", params={"voice": "nova"})
    out_i = await rt.handlers["ai_media_jobs"](image)
    out_a = await rt.handlers["ai_media_jobs"](audio)
    await rt.aclose()

    assert out_i.result_path == f"media/{image.id}.png"
    assert (s.storage_root / out_i.result_path).read_bytes() == FAKE_IMAGE
    assert out_a.result_path == f"media/{audio.id}.mp3"
    assert (s.storage_root / out_a.result_path).read_bytes() == FAKE_MP3
    assert out_i.metrics["provider"] == "openai" and out_i.metrics["model"] == "gpt-image-1"
    assert out_a.metrics["model"] == "gpt-4o-mini-tts" and out_a.metrics["mediaType"] == "audio"
    assert out_i.metrics["estimatedCostUsd"] > 0 and out_i.metrics["bytes"] == len(FAKE_IMAGE)
    bodies = {r.path: r.body for r in fake.requests}
    assert bodies["/v1/images/generations"]["size"] == "512x512"
    assert bodies["/v1/images/generations"]["prompt"] == "a lighthouse at dusk"
    assert bodies["/v1/audio/speech"]["voice"] == "nova"
    assert bodies["/v1/audio/speech"]["input"] == "Bonjour tout le monde"


async def test_placeholder_media_are_valid_png_and_wav(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(openai_api_key=None, anthropic_api_key=None, allow_placeholder=True)
    rt = await create_runtime(s, pool)
    image = await rt.handlers["ai_media_jobs"](await media_job(conn, "a red fox", "image"))
    audio = await rt.handlers["ai_media_jobs"](await media_job(conn, "hello", "audio"))
    await rt.aclose()
    assert image.metrics["provider"] == "placeholder" and image.result_path
    assert png_size((s.storage_root / image.result_path).read_bytes()) == (64, 64)
    assert audio.result_path and audio.result_path.endswith(".wav")
    with wave.open(io.BytesIO((s.storage_root / audio.result_path).read_bytes())) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 8000)
        assert w.getnframes() == 4000
    assert fake.requests == []


async def test_media_falls_through_to_the_placeholder(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "500"
    rt = await create_runtime(make_settings(allow_placeholder=True), pool)
    out = await rt.handlers["ai_media_jobs"](await media_job(conn, "a boat", "image"))
    await rt.aclose()
    assert out.metrics["provider"] == "placeholder"
    assert out.metrics["fallbacks"] == ["openai: HTTP 500 server error"]
    assert fake.count("openai", "/v1/images/generations") == 1


async def test_media_errors(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    rt = await create_runtime(make_settings(), pool)
    media = rt.handlers["ai_media_jobs"]
    job = await media_job(conn, "a tree", "image")
    odd = dataclasses.replace(job, row={**job.row, "media_type": "video"})
    with pytest.raises(InvalidJob, match="unknown media_type 'video'"):
        await media(odd)
    with pytest.raises(InvalidJob, match="Invalid job params: format: "):
        await media(await media_job(conn, "hum", "audio", params={"format": "midi"}))
    fake.modes["openai"] = "429"  # its only provider rate limited: later, no attempt
    with pytest.raises(ProvidersUnavailable, match=r"^Providers unavailable: openai: HTTP 429"):
        await media(job)
    await rt.aclose()

    only_anthropic = await create_runtime(make_settings(openai_api_key=None), pool)
    with pytest.raises(GenerationError, match="no configured provider makes media"):
        await only_anthropic.handlers["ai_media_jobs"](job)
    await only_anthropic.aclose()


# -- storage ------------------------------------------------------------------------


async def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    contents = [bytes([n]) * 200_000 for n in range(20)]
    seen: set[bytes] = set()
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            data = await store.read("courses/x/course.json")
            if data is not None:
                seen.add(data)
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    await asyncio.gather(
        *(store.write("courses/x/course.json", c, "application/json") for c in contents)
    )
    done.set()
    await task
    assert (tmp_path / "courses/x/course.json").read_bytes() in contents
    assert seen and seen <= set(contents)  # every read saw one whole version
    assert [p.name for p in (tmp_path / "courses/x").iterdir()] == ["course.json"]
    with pytest.raises(StorageError, match="invalid path"):
        await store.write("../escape", b"x", "text/plain")


async def test_supabase_storage_round_trip(supabase: FakeSupabase) -> None:
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        storage_url=supabase.storage_url,
        supabase_service_role_key=FAKE_SERVICE_KEY,
    )
    store = open_storage(s)
    assert store.location == f"{supabase.url}/storage/v1/object/courses"
    await store.write("courses/a b/course.json", b'{"v": 1}', "application/json")
    await store.write("courses/a b/course.json", b'{"v": 2}', "application/json")  # upsert
    assert supabase.objects[("courses", "courses/a b/course.json")] == (
        b'{"v": 2}',
        "application/json",
    )
    assert await store.read("courses/a b/course.json") == b'{"v": 2}'
    assert await store.read("courses/missing/course.json") is None

    supabase.fail_uploads = True
    with pytest.raises(StorageError) as err:
        await store.write("media/x.png", b"png", "image/png")
    assert err.value.message == "Storage upload failed: media/x.png: HTTP 500 internal error"
    await store.aclose()

    wrong = Settings(  # type: ignore[call-arg]
        _env_file=None, storage_url=supabase.storage_url, supabase_service_role_key="wrong"
    )
    store = open_storage(wrong)
    with pytest.raises(StorageError) as err:
        await store.write("media/y.png", b"png", "image/png")
    await store.aclose()
    assert "HTTP 400" in err.value.message and "wrong" not in err.value.message

    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
        open_storage(Settings(_env_file=None, storage_url="supabase://x.supabase.co"))  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="unsupported scheme 's3'"):
        open_storage(Settings(_env_file=None, storage_url="s3://bucket"))  # type: ignore[call-arg]


async def test_course_and_catalog_to_supabase(
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    supabase: FakeSupabase,
    make_settings: MakeSettings,
) -> None:
    s = make_settings(
        storage_url=supabase.storage_url + "/course-bucket",
        supabase_service_role_key=FAKE_SERVICE_KEY,
        cache_ttl_seconds=3600,
    )
    rt = await create_runtime(s, pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Geology"))
    again = await rt.handlers["ai_course_jobs"](await course_job(conn, "Geology", course_id="geo"))
    await rt.aclose()
    assert again.metrics["cacheHit"] is True  # read back from the bucket
    assert ("course-bucket", "courses/geology/course.json") in supabase.objects
    assert ("course-bucket", "courses/geo/course.json") in supabase.objects
    catalog = json.loads(supabase.objects[("course-bucket", CATALOG_PATH)][0])
    assert [c["id"] for c in catalog["courses"]] == ["geo", "geology"]
    assert out.metrics["storageMs"] > 0


async def test_local_storage_is_checked_by_a_write_at_start(tmp_path: Path) -> None:
    fresh = tmp_path / "not" / "yet"
    await LocalStorage(fresh).check()  # made, written, and left empty
    assert fresh.is_dir() and list(fresh.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    for root, why in (
        (Path("/proc/nope"), "No such file or directory"),
        (tmp_path / "a-file" / "results", "Not a directory"),
    ):
        with pytest.raises(ConfigError) as err:
            await LocalStorage(root).check()
        assert err.value.message.startswith(f"STORAGE_URL: cannot write to {root}: {why}")


def _supabase(url: str, key: str = FAKE_SERVICE_KEY) -> Settings:
    return Settings(_env_file=None, storage_url=url, supabase_service_role_key=key)  # type: ignore[call-arg]


async def test_supabase_storage_is_checked_at_start(supabase: FakeSupabase) -> None:
    """The bucket exists and the key may write: a probe object, then deleted."""
    store = open_storage(_supabase(supabase.storage_url + "/results"))
    await store.check()
    assert supabase.uploads == 1 and supabase.objects == {}  # written, then removed

    supabase.missing_buckets = {"results"}
    missing = r"bucket 'results' of http://127\.0\.0\.1:\d+ does not exist"
    with pytest.raises(ConfigError, match=missing):
        await store.check()
    supabase.missing_buckets = set()

    supabase.read_only = True
    with pytest.raises(ConfigError) as err:
        await store.check()
    assert "SUPABASE_SERVICE_ROLE_KEY may not write to bucket 'results'" in err.value.message
    assert "row-level security" in err.value.message
    supabase.read_only = False
    await store.aclose()

    wrong = open_storage(_supabase(supabase.storage_url, key="not-the-key"))
    with pytest.raises(ConfigError) as err:
        await wrong.check()
    await wrong.aclose()
    assert "Supabase Storage refused SUPABASE_SERVICE_ROLE_KEY" in err.value.message
    assert "not-the-key" not in err.value.message

    away = open_storage(_supabase("supabase+http://127.0.0.1:9/results"))  # discard: closed
    with pytest.raises(
        ConfigError, match=r"cannot reach Supabase Storage at http://127\.0\.0\.1:9:"
    ):
        await away.check()
    await away.aclose()
