"""The benchmark's own SQL, from bench/sql/*.sql, by `-- name:` header."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from listener.dal import named_statements

SQL_DIR = Path(__file__).resolve().parent / "sql"


@cache
def queries() -> dict[str, str]:
    paths = sorted(SQL_DIR.glob("*.sql"))
    return named_statements((p.name, p.read_text(encoding="utf-8")) for p in paths)


def sql(name: str) -> str:
    return queries()[name]
