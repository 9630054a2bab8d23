"""Settings read as a new deployment writes them: no float setting takes inf or
nan, durations have a sane ceiling, a secret of spaces is unset, LOG_LEVEL is
checked where the settings are read, and settings that contradict each other are
refused by the worker's start-up checks with both names and the reason."""

from __future__ import annotations

import pytest

from listener import settings as settings_mod
from listener.errors import ConfigError
from listener.preflight import STALE_MARGIN, check_settings
from listener.providers import configured
from listener.settings import Settings

FLOATS = sorted(
    name for name, f in Settings.model_fields.items() if f.annotation in (float, float | None)
)


def _load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_mod.load()


def test_the_float_settings_are_found() -> None:
    assert {"stale_after_seconds", "heartbeat_interval_seconds", "retention_days"} <= set(FLOATS)
    assert "daily_budget_usd_per_user" in FLOATS  # float | None


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "NaN"])
@pytest.mark.parametrize("name", FLOATS)
def test_no_float_setting_takes_a_non_finite_number(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(monkeypatch, **{name.upper(): value})
    assert err.value.message == f"Invalid setting {name.upper()}: Input should be a finite number"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("STALE_AFTER_SECONDS", "1e300", "must be at most 315360000 (ten years)"),
        ("SWEEP_INTERVAL_SECONDS", "4e8", "must be at most 315360000 (ten years)"),
        ("RETENTION_DAYS", "1e9", "must be at most 36500 (a century)"),
    ],
)
def test_durations_have_a_ceiling(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(monkeypatch, **{name: value})
    assert err.value.message == f"Invalid setting {name}: {says}"


def test_a_secret_of_spaces_is_unset_and_secrets_lose_their_spaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = _load(
        monkeypatch,
        OPENAI_API_KEY="   ",
        ANTHROPIC_API_KEY=" sk-ant-kept \n",
        DATABASE_URL="\t",
        ALLOW_PLACEHOLDER="0",
    )
    assert s.openai_api_key is None and s.database_url is None
    assert s.anthropic_api_key is not None
    assert s.anthropic_api_key.get_secret_value() == "sk-ant-kept"
    assert configured(s) == ["anthropic"]  # the blank key is not a provider
    assert configured(Settings(openai_api_key="  ", anthropic_api_key=None)) == []


def test_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(monkeypatch, LOG_LEVEL="debug").log_level == "DEBUG"
    with pytest.raises(ConfigError) as err:
        _load(monkeypatch, LOG_LEVEL="verbose")
    assert err.value.message.startswith("Invalid setting LOG_LEVEL: must be one of TRACE, DEBUG")
    assert "'verbose'" in err.value.message


@pytest.mark.parametrize(
    ("heartbeat", "stale", "ok"),
    [(30, 300, True), (30, 90, True), (30, 89.9, False), (30, 12, False), (0.3, 2, True)],
)
def test_stale_after_must_leave_room_for_missed_heartbeats(
    heartbeat: float, stale: float, ok: bool
) -> None:
    s = Settings(heartbeat_interval_seconds=heartbeat, stale_after_seconds=stale)
    if ok:
        check_settings(s)
        return
    with pytest.raises(ConfigError) as err:
        check_settings(s)
    text = err.value.message
    assert text.startswith(
        f"STALE_AFTER_SECONDS ({stale:g}) must be at least {STALE_MARGIN} x "
        f"HEARTBEAT_INTERVAL_SECONDS ({heartbeat:g})"
    )
    assert "run again elsewhere" in text  # and why
