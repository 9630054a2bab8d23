"""docs/reference.md names what exists: every command of the CLI, settings that
the Settings class reads, functions that sql/schema.sql defines, routes the
dashboard serves. A public name added or renamed without the reference fails
here."""

from __future__ import annotations

import re
from pathlib import Path

from listener.cli import build_parser
from listener.settings import Settings
from listener.web.app import create_app

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
SCHEMA = (ROOT / "sql" / "schema.sql").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = REFERENCE.index(f"## {title}")
    end = REFERENCE.find("\n## ", start + 1)
    return REFERENCE[start : end if end >= 0 else None]


def test_every_command_of_the_cli_is_in_the_reference() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands
    text = _section("Command line")
    missing = [c for c in commands if f"`ai-jobs {c}" not in text and f"ai-jobs {c}`" not in text]
    assert missing == []


def test_every_setting_in_the_reference_is_read() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    first_cells = re.findall(r"^\| ([^|]+) \|", _section("Settings"), re.MULTILINE)
    named = [n for cell in first_cells for n in re.findall(r"`([A-Z][A-Z_]+)`", cell)]
    assert len(named) > 20 and [n for n in named if n not in fields] == []


def test_every_function_in_the_reference_is_in_the_schema() -> None:
    named = set(re.findall(r"`([a-z_]+)\(", _section("SQL functions"))) - {"table"}
    assert {"mark_stale_jobs", "requeue_job", "cancel_job", "claim_jobs"} <= named
    missing = [f for f in named if f"FUNCTION public.{f}(" not in SCHEMA]
    assert missing == []


def test_every_dashboard_route_is_in_the_reference() -> None:
    settings = Settings(admin_token="x" * 32, jwt_secret="y" * 32)  # the /v1/ routes too
    app = create_app(settings, "postgresql://localhost/none", "x" * 32)
    text = _section("HTTP routes")
    paths = [re.sub(r"\{(\w+):\w+\}", r"{\1}", getattr(r, "path", "")) for r in app.routes]
    assert "/admin/jobs/{id}" in paths and "/v1/jobs/{id}/events" in paths
    # A route is named whole, or (an action) by its last part after a named page.
    named = set(re.findall(r"`(?:GET |POST )?(/[^`\s,]*)", text))
    missing = [p for p in paths if p not in named and "/" + p.rsplit("/", 1)[-1] not in named]
    assert missing == []
