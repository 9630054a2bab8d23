"""All configuration, read once from the environment (docs/reference.md, "Settings")."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Defaults mirror the runbook.
WORKER_CONCURRENCY = 3
SWEEP_INTERVAL_SECONDS = 60.0
HEARTBEAT_INTERVAL_SECONDS = 30.0
PROGRESS_INTERVAL_SECONDS = 1.0  # a running job's progress is written at most this often
STALE_AFTER_SECONDS = 300.0
SHUTDOWN_GRACE_SECONDS = 25.0
RETRY_BASE_SECONDS = 10.0
MAX_RETRIES = 3
RATE_LIMIT_PER_HOUR = 10
RETENTION_DAYS = 90
# Limits of a client's request, enforced by the database (ai_job_settings).
MAX_SUBJECT_LENGTH = 500  # characters
MAX_PROMPT_LENGTH = 4000  # characters (OpenAI's speech input takes 4096)
MAX_PARAMS_BYTES = 8192  # of params as JSON text
AI_TIMEOUT_SECONDS = 50.0
PROVIDERS = ("openai", "anthropic")
DEFAULT_STORAGE = ".storage"
# Models: override per deployment; any model the provider's structured output supports.
OPENAI_MODEL = "gpt-4.1-mini"
ANTHROPIC_MODEL = "claude-haiku-4-5"
OPENAI_IMAGE_MODEL = "gpt-image-1"
OPENAI_TTS_MODEL = "gpt-4o-mini-tts"
OPENAI_TTS_VOICE = "alloy"
AI_MAX_OUTPUT_TOKENS = 16000
CACHE_TTL_SECONDS = 86400.0  # a day; 0 turns the course cache off
CATALOG_BATCH_JOBS = 10  # render courses/catalog.json at most once per N finished courses
BATCH_COLLECT_SECONDS = 60.0  # batch jobs gather this long before their batch is sent
BATCH_POLL_SECONDS = 30.0  # how often an open batch's watcher asks its provider
CATALOG_BATCH_SECONDS = 5.0  # ... or once T seconds after the first unrendered one
# Providers' breakers and waits (docs/generation.md, "Breakers").
PROVIDER_BREAKER_THRESHOLD = 3  # consecutive unwell calls that open a provider's breaker
PROVIDER_BREAKER_COOLDOWN_SECONDS = 30.0  # open this long, then one probe call decides
PROVIDER_AUTH_COOLDOWN_SECONDS = 3600.0  # after a 401/403/404: every call would fail alike
PROVIDER_RETRY_AFTER_MAX_SECONDS = 600.0  # a provider's retry-after is obeyed up to this
PROVIDER_OUTAGE_MAX_WAIT_SECONDS = 1800.0  # jobs wait this long without counting attempts
# PROVIDER_LIMITS keys, and the quota kind each caps (docs/generation.md, "Provider quotas").
LIMIT_KEYS = {"rpm": "requests", "tpm": "tokens", "itpm": "input_tokens", "otpm": "output_tokens"}

# Alert thresholds: the runbook's "Recommended Alerts".
ALERT_DEAD_LETTER_PER_HOUR = 5
ALERT_STALE_PROCESSING = 3
ALERT_PENDING_DEPTH = 20
ALERT_AVG_PROCESSING_SECONDS = 90.0
ALERT_FAILURE_RATE_PERCENT = 10.0
ALERT_RATE_LIMIT_VIOLATIONS_PER_HOUR = 5
ALERT_BUDGET_REJECTIONS_PER_HOUR = 5
ALERT_INTERVAL_SECONDS = 60.0  # how often the worker evaluates the alert rules

# The end-user API (listener/web/api.py): open event streams at once.
API_STREAMS_PER_USER = 10
API_STREAMS_PER_PROCESS = 2000
JWT_AUDIENCE = "authenticated"  # what Supabase puts in its users' tokens
MIN_JWT_SECRET = 32  # characters; an HS256 secret shorter than that can be guessed

LISTEN_MODES = ("listen", "poll")
LISTEN_PROBE_SECONDS = 30.0  # an idle worker proves its LISTEN connection this often
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")  # loguru's
# No duration setting may exceed ten years: beyond that a value is a typo, and far
# beyond it PostgreSQL's intervals and the event loop's timers overflow (a sweep
# with STALE_AFTER_SECONDS=1e300 fails with "interval out of range").
MAX_SECONDS = 10 * 365 * 86400.0
MAX_RETENTION_DAYS = 36500.0  # a century


class Settings(BaseSettings):
    # allow_inf_nan=False: inf and nan are refused in every float setting (a sweep
    # with STALE_AFTER_SECONDS=inf would fail at every run, nan compares false to all).
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", allow_inf_nan=False
    )

    database_url: SecretStr | None = None
    worker_concurrency: int = Field(WORKER_CONCURRENCY, ge=1, le=1000)
    sweep_interval_seconds: float = Field(SWEEP_INTERVAL_SECONDS, gt=0)
    heartbeat_interval_seconds: float = Field(HEARTBEAT_INTERVAL_SECONDS, gt=0)
    progress_interval_seconds: float = Field(PROGRESS_INTERVAL_SECONDS, gt=0, le=3600)
    stale_after_seconds: float = Field(STALE_AFTER_SECONDS, gt=0)
    shutdown_grace_seconds: float = Field(SHUTDOWN_GRACE_SECONDS, ge=0)
    retry_base_seconds: float = Field(RETRY_BASE_SECONDS, ge=0)
    max_retries: int = Field(MAX_RETRIES, ge=0, le=100)  # the database's bound
    rate_limit_per_hour: int = Field(RATE_LIMIT_PER_HOUR, ge=0)
    max_subject_length: int = Field(MAX_SUBJECT_LENGTH, ge=1, le=1_000_000)
    max_prompt_length: int = Field(MAX_PROMPT_LENGTH, ge=1, le=1_000_000)
    max_params_bytes: int = Field(MAX_PARAMS_BYTES, ge=2, le=10_000_000)
    retention_days: float = Field(RETENTION_DAYS, gt=0)

    ai_provider_priority: str = ",".join(PROVIDERS)
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    ai_timeout_seconds: float = Field(AI_TIMEOUT_SECONDS, gt=0)
    allow_placeholder: bool = False
    placeholder_delay_ms: int = Field(0, ge=0)
    openai_model: str = OPENAI_MODEL
    anthropic_model: str = ANTHROPIC_MODEL
    openai_image_model: str = OPENAI_IMAGE_MODEL
    openai_tts_model: str = OPENAI_TTS_MODEL
    openai_tts_voice: str = OPENAI_TTS_VOICE
    ai_max_output_tokens: int = Field(AI_MAX_OUTPUT_TOKENS, ge=256)
    cache_ttl_seconds: float = Field(CACHE_TTL_SECONDS, ge=0)
    catalog_batch_jobs: int = Field(CATALOG_BATCH_JOBS, ge=1)
    catalog_batch_seconds: float = Field(CATALOG_BATCH_SECONDS, ge=0)
    batch_collect_seconds: float = Field(BATCH_COLLECT_SECONDS, ge=0)
    batch_poll_seconds: float = Field(BATCH_POLL_SECONDS, gt=0)
    supabase_service_role_key: SecretStr | None = None
    provider_breaker_threshold: int = Field(PROVIDER_BREAKER_THRESHOLD, ge=1)
    provider_breaker_cooldown_seconds: float = Field(PROVIDER_BREAKER_COOLDOWN_SECONDS, gt=0)
    provider_auth_cooldown_seconds: float = Field(PROVIDER_AUTH_COOLDOWN_SECONDS, gt=0)
    provider_retry_after_max_seconds: float = Field(PROVIDER_RETRY_AFTER_MAX_SECONDS, ge=0)
    provider_outage_max_wait_seconds: float = Field(PROVIDER_OUTAGE_MAX_WAIT_SECONDS, ge=0)
    pricing_overrides: str | None = None  # JSON, or the path of a JSON file (pricing.py)
    # Caps per provider (each of its models) or per provider/model: parse_provider_limits.
    provider_limits: str | None = None
    # Written to ai_job_settings when migration 015 adds it, or by `migrate --write-settings`.
    daily_budget_usd_per_user: float | None = Field(None, ge=0)

    storage_url: str = DEFAULT_STORAGE
    admin_token: SecretStr | None = None
    # The end-user API under /v1/: on when either is set (docs/api.md).
    jwt_secret: SecretStr | None = None
    jwt_jwks_url: str | None = None
    jwt_audience: str = JWT_AUDIENCE
    api_streams_per_user: int = Field(API_STREAMS_PER_USER, ge=1, le=100_000)
    api_streams_per_process: int = Field(API_STREAMS_PER_PROCESS, ge=1, le=1_000_000)
    # Origins whose pages may call the API from a browser (CORS), comma-separated;
    # `*` for any (safe with bearer tokens: no cookie rides along).
    api_cors_origins: str = ""
    port: int = Field(8000, ge=1, le=65535)
    sentry_dsn: SecretStr | None = None
    alert_webhook_url: SecretStr | None = None
    alert_interval_seconds: float = Field(ALERT_INTERVAL_SECONDS, gt=0)  # worker evaluates alerts
    log_format: str = "text"
    listen_mode: str = "listen"
    listen_probe_seconds: float = Field(LISTEN_PROBE_SECONDS, gt=0)
    # An alert fires when its value is above its threshold.
    alert_dead_letter_per_hour: int = Field(ALERT_DEAD_LETTER_PER_HOUR, ge=0)
    alert_stale_processing: int = Field(ALERT_STALE_PROCESSING, ge=0)
    alert_pending_depth: int = Field(ALERT_PENDING_DEPTH, ge=0)
    alert_avg_processing_seconds: float = Field(ALERT_AVG_PROCESSING_SECONDS, ge=0)
    alert_failure_rate_percent: float = Field(ALERT_FAILURE_RATE_PERCENT, ge=0, le=100)
    alert_rate_limit_violations_per_hour: int = Field(ALERT_RATE_LIMIT_VIOLATIONS_PER_HOUR, ge=0)
    alert_budget_rejections_per_hour: int = Field(ALERT_BUDGET_REJECTIONS_PER_HOUR, ge=0)
    log_level: str = "INFO"

    @field_validator("*", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, v: Any, info: ValidationInfo) -> Any:
        """A secret of only spaces counts as unset, like an empty one, and any
        secret loses the spaces around it. A platform's form or an .env template
        leaves `OPENAI_API_KEY= ` as easily as `OPENAI_API_KEY=`: both say "no
        key", and a worker left with no provider refuses to start anyway. Taken
        as set, the key would be sent and every call fail with a 401."""
        if info.field_name in _SECRET_FIELDS and isinstance(v, str):
            return v.strip() or None
        return v

    @field_validator("*")
    @classmethod
    def _duration(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if isinstance(v, float) and name.endswith("_seconds") and v > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS:.0f} (ten years)")
        if name == "retention_days" and isinstance(v, float) and v > MAX_RETENTION_DAYS:
            raise ValueError(f"must be at most {MAX_RETENTION_DAYS:.0f} (a century)")
        return v

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:
            return None
        url = urlsplit(v)
        local = url.hostname in ("localhost", "127.0.0.1", "::1")
        if not (url.scheme == "https" or (url.scheme == "http" and local)) or not url.hostname:
            # Keys fetched over plain http could be anyone's on the way.
            raise ValueError("must be an https:// URL (http:// only on this machine)")
        return v

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_JWT_SECRET:
            raise ValueError(f"must be at least {MIN_JWT_SECRET} characters (HS256)")
        return v

    @cached_property
    def cors_origins(self) -> frozenset[str]:
        return frozenset(
            o.strip().rstrip("/") for o in self.api_cors_origins.split(",") if o.strip()
        )

    @property
    def api_enabled(self) -> bool:
        """The end-user API answers under /v1/ (else every /v1/ path is a 404)."""
        return self.jwt_secret is not None or self.jwt_jwks_url is not None

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return level

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("text", "json"):
            raise ValueError("LOG_FORMAT must be 'text' or 'json'")
        return v

    @field_validator("listen_mode")
    @classmethod
    def _listen_mode(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in LISTEN_MODES:
            raise ValueError("LISTEN_MODE must be 'listen' or 'poll'")
        return v

    @field_validator("ai_provider_priority")
    @classmethod
    def _providers(cls, v: str) -> str:
        names = [p.strip().lower() for p in v.split(",") if p.strip()]
        unknown = [p for p in names if p not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
        return ",".join(names)

    @field_validator("provider_limits")
    @classmethod
    def _provider_limits(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        parse_provider_limits(v)  # ValueError naming the problem
        return v

    @cached_property
    def provider_caps(self) -> dict[str, dict[str, int]]:
        """PROVIDER_LIMITS by "provider" or "provider/model": {quota kind: cap}."""
        return parse_provider_limits(self.provider_limits)

    def caps_for(self, provider: str, model: str) -> dict[str, int]:
        """The caps of one model: its provider's, with its own entry's on top."""
        caps = self.provider_caps
        return {**caps.get(provider, {}), **caps.get(f"{provider}/{model}", {})}

    @cached_property
    def provider_order(self) -> list[str]:
        return [p for p in self.ai_provider_priority.split(",") if p]

    @property
    def dsn(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    @classmethod
    def secret_fields(cls) -> list[str]:
        """The settings typed SecretStr: a new secret setting is one of them
        by its type alone, and scrubbed everywhere without a change here."""
        return [
            name
            for name, f in cls.model_fields.items()
            if f.annotation is SecretStr or SecretStr in get_args(f.annotation)
        ]

    def secrets(self) -> list[str]:
        """Every secret value set (errors.scrub hides them in logs, job errors,
        provider errors and Sentry events)."""
        plain = []
        for name in self.secret_fields():
            value = getattr(self, name)
            # model_copy(update=...) does not validate, so a copy may hold a plain str.
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if text:
                plain.append(str(text))
        return plain

    def request_limits(self) -> dict[str, int]:
        """The limits of a client's request, as `ai-jobs migrate` writes them."""
        return {
            "max_subject_length": self.max_subject_length,
            "max_prompt_length": self.max_prompt_length,
            "max_params_bytes": self.max_params_bytes,
        }

    @property
    def storage_root(self) -> Path:
        url = self.storage_url
        return Path(url.removeprefix("file://")).expanduser()


_SECRET_FIELDS = frozenset(Settings.secret_fields())


def parse_provider_limits(text: str | None) -> dict[str, dict[str, int]]:
    """`openai=rpm:500,tpm:200000;anthropic/claude-haiku-4-5=rpm:50,otpm:8000` as
    {"openai": {"requests": 500, "tokens": 200000}, "anthropic/claude-haiku-4-5":
    {...}}; ValueError naming the first thing wrong."""
    found: dict[str, dict[str, int]] = {}
    for entry in (text or "").split(";"):
        if not entry.strip():
            continue
        target, sep, body = entry.partition("=")
        provider, slash, model = target.strip().partition("/")
        provider, model = provider.strip().lower(), model.strip()
        if not sep or provider not in PROVIDERS or (slash and not model):
            raise ValueError(
                f"{entry.strip()[:60]!r}: expected provider=key:value,... or "
                f"provider/model=key:value,... with a provider of {', '.join(PROVIDERS)}"
            )
        target = f"{provider}/{model}" if model else provider
        if target in found:
            raise ValueError(f"{target} is given twice")
        caps: dict[str, int] = {}
        for pair in body.split(","):
            key, colon, value = pair.partition(":")
            key = key.strip().lower()
            if key not in LIMIT_KEYS or not colon:
                keys = ", ".join(LIMIT_KEYS)
                raise ValueError(f"{target}: {pair.strip()[:40]!r} is not one of {keys}:<number>")
            if LIMIT_KEYS[key] in caps:
                raise ValueError(f"{target}: {key} is given twice")
            number = value.strip().replace("_", "")
            if not number.isascii() or not number.isdigit() or not 0 < int(number) <= 10**12:
                raise ValueError(
                    f"{target}: {key} must be a whole number from 1 to 10^12, got {value!r}"
                )
            caps[LIMIT_KEYS[key]] = int(number)
        found[target] = caps
    return found


def load() -> Settings:
    """Read the settings; a bad value raises ConfigError with one line naming it."""
    from pydantic import ValidationError

    from listener.errors import ConfigError

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        why = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"Invalid setting {name}: {why}") from None
