"""The benchmark's own SQL, from bench/sql/*.sql, by `-- name:` header."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
SQL_DIR = Path(__file__).resolve().parent / "sql"


@cache
def queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        parts = _NAME.split(path.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise KeyError(f"query {name!r} defined twice ({path.name})")
            found[name] = body.strip()
    return found


def sql(name: str) -> str:
    return queries()[name]
