"""`ai-jobs demo` as a newcomer runs it: no DATABASE_URL, so an embedded
PostgreSQL; every sample job must reach its expected final state."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import AI_JOBS, ROOT, env

# The demo's own subprocess timeout is 120 s.
pytestmark = pytest.mark.timeout(120)


def test_demo_on_embedded_postgres(tmp_path: Path) -> None:
    e = env(None, PYTHONPATH=str(ROOT), COLUMNS="160")
    e.pop("XDG_RUNTIME_DIR", None)  # as in a container, CI or `su`: no runtime directory
    p = subprocess.run(
        [*AI_JOBS, "demo"], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Warning" not in p.stderr, p.stderr  # platformdirs' RuntimeDirWarning, and any other
    assert "in the dead letter" in p.stdout and "embedded PostgreSQL stopped" in p.stdout
    assert "Catalog:" in p.stdout
    storage = tmp_path / ".demo" / "storage"
    assert (storage / "courses" / "algebra-basics" / "course.json").is_file()
    assert (storage / "courses" / "catalog.json").is_file()
    assert {f.suffix for f in (storage / "media").iterdir()} == {".png", ".wav"}
    # nothing left running: the data folder holds no live server
    assert not (tmp_path / ".demo" / "pgdata" / "postmaster.pid").exists()
