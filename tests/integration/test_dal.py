"""The data-access layer against the sources and a migrated database: every
`-- name:` statement has its object in listener/dal.py and every object its
statement; every object is used in the package and every one used exists; no
statement is called by its name around the layer; and each row type has exactly
the columns, of the types, that PostgreSQL says its statement returns."""

from __future__ import annotations

import ast
import types
import typing
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from listener import dal
from tests.helpers import ROOT, connect

PACKAGE = ROOT / "listener"
# Named statements the package does not call yet, and who does.
NOT_CALLED_BY_THE_PACKAGE = {
    # Claims one given job: the handler tests claim with it (tests/integration/handlers);
    # the worker's fast path claims with claim_due_job instead.
    "CLAIM_JOB",
}
STATEMENTS = {name: obj for name, obj in vars(dal).items() if isinstance(obj, dal.Statement)}


def sources() -> dict[Path, ast.Module]:
    return {
        p: ast.parse(p.read_text(encoding="utf-8"), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "dal.py"
    }


def used_names() -> dict[str, list[str]]:
    """dal.X and `from listener.dal import X` in the package: X -> where."""
    found: dict[str, list[str]] = {}
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "dal"
            ):
                found.setdefault(node.attr, []).append(str(path.relative_to(ROOT)))
            elif isinstance(node, ast.ImportFrom) and node.module == "listener.dal":
                for alias in node.names:
                    found.setdefault(alias.name, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_named_statement_has_its_object_and_no_object_lacks_one() -> None:
    assert set(dal.queries()) == {s.name for s in STATEMENTS.values()}
    for constant, s in STATEMENTS.items():
        assert constant == s.name.upper(), s


def test_every_statement_is_used_in_the_package_and_every_one_used_exists() -> None:
    used = used_names()
    unused = set(STATEMENTS) - set(used) - NOT_CALLED_BY_THE_PACKAGE
    assert not unused, f"named statements no code calls: {sorted(unused)}"
    layer = {n for n in vars(dal) if not n.startswith("_")}
    missing = {n: where for n, where in used.items() if n not in layer}
    assert not missing, f"used but not in listener/dal.py: {missing}"
    assert not NOT_CALLED_BY_THE_PACKAGE & set(used), "called now: take it off the list"


def test_no_statement_is_called_by_its_name_around_the_layer() -> None:
    around = []
    for path, tree in sources().items():
        if path.name == "db.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "db"
                and node.attr in ("fetch", "sql", "queries")
            ):
                around.append(f"{path.relative_to(ROOT)}:{node.lineno} db.{node.attr}")
    assert not around


# -- the rows against the database ---------------------------------------------------

PG_TYPES: dict[str, type] = {
    "bigint": int,
    "integer": int,
    "double precision": float,
    "numeric": Decimal,
    "text": str,
    "uuid": UUID,
    "timestamp with time zone": datetime,
    "interval": timedelta,
    "boolean": bool,
    "jsonb": dict,  # objects here; Any is accepted too
    "text[]": list,
    "bigint[]": list,
}


def described(conn: Any, text: bytes) -> list[tuple[str, str]]:
    """(column, type) of a statement, as PostgreSQL describes it (not run)."""
    pgconn = conn.pgconn
    result = pgconn.prepare(b"", text)
    assert result.error_message == b"", result.error_message.decode()
    desc = pgconn.describe_prepared(b"")
    names = {
        r["oid"]: r["name"]
        for r in conn.execute("select oid, format_type(oid, null) as name from pg_type")
    }
    return [(desc.fname(i).decode(), names[desc.ftype(i)]) for i in range(desc.nfields)]


def _accepts(annotation: Any, wanted: type) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, wanted) for a in typing.get_args(annotation) if a is not type(None))
    return (origin or annotation) is wanted


@pytest.mark.parametrize(
    "constant", sorted(n for n, s in STATEMENTS.items() if isinstance(s, dal.Query))
)
def test_each_row_type_is_what_its_statement_returns(constant: str, db_url: str) -> None:
    query = STATEMENTS[constant]
    assert isinstance(query, dal.Query)
    hints = typing.get_type_hints(query.row)
    with connect(db_url) as conn:
        columns = described(conn, query.positional()[0])
    returned = [(c, t) for c, t in columns if t != "void"]  # a function called for its effect
    assert [c for c, _ in returned] and sorted(hints) == sorted(c for c, _ in returned)
    for column, pg_type in returned:
        assert _accepts(hints[column], PG_TYPES[pg_type]), (column, pg_type, hints[column])


@pytest.mark.parametrize(
    "constant",
    sorted(n for n, s in STATEMENTS.items() if not isinstance(s, dal.Query)),
)
def test_each_statement_without_rows_returns_none_to_read(constant: str, db_url: str) -> None:
    with connect(db_url) as conn:
        columns = described(conn, STATEMENTS[constant].positional()[0])
    assert all(t == "void" or c == "?column?" for c, t in columns), columns
