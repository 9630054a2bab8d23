"""A database prepared the way Supabase prepares one, before `ai-jobs migrate` runs.

Supabase creates the roles `anon`, `authenticated` and `service_role`, an
`auth.uid()` that reads the caller's JWT from `request.jwt.claims`, and default
privileges that grant every role everything later created in schema `public`:

    alter default privileges in schema public
        grant all on tables | functions | sequences to anon, authenticated, service_role;

so whatever a migration forgets to revoke is open to every browser holding the
anon key. `prepare()` reproduces that on a plain PostgreSQL; `as_user()` and
`as_anon()` make a connection act as PostgREST does for a request (a role and
the JWT claims, set on the session).

Fixtures (tests/conftest.py): `supabase_db_url`, a fresh migrated database of
that kind per test, cloned from a template made once per run.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

ROLES = ("anon", "authenticated", "service_role")

# Supabase's own definition (supabase/postgres, migrations/db/init-scripts).
AUTH_UID = """
create or replace function auth.uid() returns uuid
language sql stable
as $$
    select nullif(
        coalesce(
            current_setting('request.jwt.claim.sub', true),
            (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')
        ),
        ''
    )::uuid
$$
"""

ROLE_SETUP = """
do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated', 'service_role'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                if r = 'service_role' then
                    create role service_role nologin noinherit bypassrls;
                else
                    execute format('create role %I nologin noinherit', r);
                end if;
            exception when duplicate_object or unique_violation then
                null;  -- roles are cluster-wide: another database made it meanwhile
            end;
        end if;
    end loop;
end
$$
"""

DATABASE_SETUP = [
    "create schema if not exists auth",
    AUTH_UID,
    "grant usage on schema auth to anon, authenticated, service_role",
    "grant execute on function auth.uid() to anon, authenticated, service_role",
    "grant usage on schema public to anon, authenticated, service_role",
    "alter default privileges in schema public"
    " grant all on tables to anon, authenticated, service_role",
    "alter default privileges in schema public"
    " grant all on functions to anon, authenticated, service_role",
    "alter default privileges in schema public"
    " grant all on sequences to anon, authenticated, service_role",
]


def prepare(url: str) -> None:
    """Make the database at `url` look like a fresh Supabase project (run before
    `ai-jobs migrate`)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ROLE_SETUP)
        for statement in DATABASE_SETUP:
            conn.execute(statement)


def claims(user: uuid.UUID | str, role: str = "authenticated") -> str:
    return json.dumps({"sub": str(user), "role": role, "aud": role})


def as_user(conn: psycopg.Connection[Any], user: uuid.UUID | str) -> None:
    """The connection acts as a signed-in user through PostgREST."""
    conn.execute("select set_config('request.jwt.claims', %s, false)", [claims(user)])
    conn.execute("set role authenticated")


def as_anon(conn: psycopg.Connection[Any]) -> None:
    """The connection acts as a browser holding the anon key."""
    conn.execute(
        "select set_config('request.jwt.claims', %s, false)",
        [json.dumps({"role": "anon"})],
    )
    conn.execute("set role anon")


def as_service(conn: psycopg.Connection[Any]) -> None:
    """The connection acts with the service_role key (server side)."""
    conn.execute(
        "select set_config('request.jwt.claims', %s, false)",
        [json.dumps({"role": "service_role"})],
    )
    conn.execute("set role service_role")


async def aas_user(conn: psycopg.AsyncConnection[Any], user: uuid.UUID | str) -> None:
    await conn.execute("select set_config('request.jwt.claims', %s, false)", [claims(user)])
    await conn.execute("set role authenticated")
