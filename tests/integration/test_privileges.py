"""Least privilege, checked on every object the migrations create.

The test lists every table, view, sequence and function in schema public and
compares each grantee's privileges (PUBLIC, anon, authenticated, service_role and
anyone else but the object's owner) with ALLOWED below, on a database prepared
like Supabase (default privileges granting everything to anon, authenticated and
service_role, set before `ai-jobs migrate`) and on a plain one. A migration that
creates an object and forgets to revoke the defaults, or grants more than it
should, fails here and the message names the object, the role and the privilege.

Adding an object: a new entry in ALLOWED, with the privileges each role needs
(none: an empty dict). See docs/security.md for what each role may do and why.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import connect

# -- the allow-list -------------------------------------------------------------

LIFECYCLE = [
    "id",
    "status",
    "params",
    "retry_count",
    "max_retries",
    "error",
    "created_by",
    "created_at",
    "run_after",
    "started_at",
    "last_heartbeat",
    "completed_at",
    "result_path",
    "metrics",
]
# sql/024: a user watches their job (progress, the course as it grows, batch) and
# asks for the batch price and a trace; trace_parent is written, not read back.
COURSE_PUBLIC = [*LIFECYCLE, "subject", "course_id", "progress", "partial_result", "batch"]
MEDIA_PUBLIC = [*LIFECYCLE, "prompt", "media_type", "course_id", "progress", "batch"]
COURSE_REQUEST = ["subject", "params", "created_by", "course_id", "batch", "trace_parent"]
MEDIA_REQUEST = [
    "prompt",
    "media_type",
    "params",
    "created_by",
    "course_id",
    "batch",
    "trace_parent",
]
SETTINGS_PUBLIC = [
    "singleton",
    "rate_limit_per_hour",
    "max_subject_length",
    "max_prompt_length",
    "max_params_bytes",
]

WRITE = {"SELECT", "INSERT", "UPDATE", "DELETE"}
EXECUTE = {"EXECUTE"}


def cols(privilege: str, columns: list[str]) -> set[str]:
    return {f"{privilege}({c})" for c in columns}


# Every object in schema public -> {grantee: privileges}. A grantee not named has
# no privilege at all; PUBLIC is the PostgreSQL pseudo-role "every role".
ALLOWED: dict[str, dict[str, set[str]]] = {
    # sql/001, 004, 010, 011
    "table ai_course_jobs": {
        "service_role": WRITE,
        "authenticated": cols("SELECT", COURSE_PUBLIC) | cols("INSERT", COURSE_REQUEST),
    },
    "table ai_media_jobs": {
        "service_role": WRITE,
        "authenticated": cols("SELECT", MEDIA_PUBLIC) | cols("INSERT", MEDIA_REQUEST),
    },
    "table ai_job_settings": {
        "service_role": {"SELECT", "UPDATE"},
        "authenticated": cols("SELECT", SETTINGS_PUBLIC),
    },
    "table ai_job_counter_samples": {"service_role": {"SELECT", "INSERT", "DELETE"}},
    "sequence ai_job_rate_limit_rejections": {"service_role": {"SELECT"}},
    "table ai_jobs_migrations": {"service_role": {"SELECT"}},
    "view ai_job_metrics": {"service_role": {"SELECT"}},
    # sql/006
    "table ai_course_catalog": {"service_role": WRITE},
    # sql/008
    "table ai_job_alert_state": {"service_role": {"SELECT", "INSERT", "UPDATE"}},
    # sql/011
    "table ai_course_owners": {"service_role": WRITE},
    # functions: sql/003, 009, 011; triggers/005, 007
    "function ai_job_table(text)": {"service_role": EXECUTE, "authenticated": EXECUTE},
    "function ai_job_type(text)": {"service_role": EXECUTE},
    "function ai_job_slugify(text)": {"service_role": EXECUTE},
    "function ai_course_jobs_defaults()": {},
    "function ai_job_user_jobs_last_hour(uuid,text)": {
        "service_role": EXECUTE,
        "authenticated": EXECUTE,
    },
    "function check_ai_job_rate_limit(uuid,text)": {
        "service_role": EXECUTE,
        "authenticated": EXECUTE,
    },
    "function mark_stale_jobs(interval)": {"service_role": EXECUTE},
    "function move_to_dead_letter()": {"service_role": EXECUTE},
    "function requeue_job(uuid,text)": {"service_role": EXECUTE},
    "function purge_old_jobs(interval)": {"service_role": EXECUTE},
    "function claim_jobs(text,text,integer)": {"service_role": EXECUTE},
    "function claim_job(text,uuid,text)": {"service_role": EXECUTE},
    "function claim_due_job(text,uuid,text)": {"service_role": EXECUTE},
    "function ai_job_claim_batch(text,text,integer)": {"service_role": EXECUTE},
    "function ai_job_claim_media(text,integer,text[],integer[])": {"service_role": EXECUTE},
    "function heartbeat_jobs(text,uuid[],uuid[])": {"service_role": EXECUTE},
    "function complete_jobs(text,uuid[],uuid[],text[],jsonb[])": {"service_role": EXECUTE},
    "function complete_and_claim(text,text,integer,uuid[],uuid[],text[],jsonb[])": {
        "service_role": EXECUTE
    },
    "function fail_job(text,uuid,uuid,text,double precision,boolean)": {"service_role": EXECUTE},
    "function release_jobs(text,uuid[],uuid[])": {"service_role": EXECUTE},
    "function rescue_stale_jobs(integer)": {"service_role": EXECUTE},
    "function next_job_due()": {"service_role": EXECUTE},
    "function ai_jobs_notify_insert()": {},
    "function ai_jobs_notify_pending()": {},
    "function ai_jobs_notify_events()": {},
    "function ai_job_admit()": {},
    "function ai_job_claim_course_id(text,uuid,boolean)": {},
    # sql/012
    "table ai_job_workers": {"service_role": WRITE},
    # sql/014
    "table ai_job_provider_state": {"service_role": WRITE},
    "table ai_job_usage_totals": {"service_role": WRITE},
    "function ai_job_provider_failed(text,text,text,integer,double precision,double precision)": {
        "service_role": EXECUTE
    },
    "function ai_job_provider_succeeded(text)": {"service_role": EXECUTE},
    "function ai_job_provider_probe(text,double precision)": {"service_role": EXECUTE},
    "function ai_job_provider_reset(text)": {"service_role": EXECUTE},
    "function defer_job(text,uuid,uuid,double precision,text,double precision)": {
        "service_role": EXECUTE
    },
    "function ai_job_add_usage(text[],text[],bigint[],bigint[],bigint[],bigint[],numeric[])": {
        "service_role": EXECUTE
    },
    # sql/028
    "table ai_job_call_histograms": {"service_role": WRITE},
    "function ai_job_add_call_histograms(text[],text[],text[],text[],text[],text[],"
    "double precision[],bigint[])": {"service_role": EXECUTE},
    # sql/015
    "sequence ai_job_budget_rejections": {"service_role": {"USAGE", "SELECT"}},
    "function ai_job_user_spend(uuid,timestamp with time zone)": {"service_role": EXECUTE},
    # sql/016
    "table ai_job_attempts": {"service_role": WRITE},
    "sequence ai_job_attempts_id_seq": {},
    "table ai_job_queues": {"service_role": WRITE},
    "function ai_job_set_paused(text,boolean)": {"service_role": EXECUTE},
    "function pause_jobs(text)": {"service_role": EXECUTE},
    "function resume_jobs(text)": {"service_role": EXECUTE},
    "function ai_job_cancel(uuid,text,uuid)": {"service_role": EXECUTE},
    # a signed-in user cancels their own jobs (cancel_job hands them to ai_job_cancel_own)
    "function cancel_job(uuid,text)": {"service_role": EXECUTE, "authenticated": EXECUTE},
    "function ai_job_cancel_own(uuid,text)": {"service_role": EXECUTE, "authenticated": EXECUTE},
    # sql/017
    "table ai_job_status_counts": {"service_role": WRITE},
    "table ai_job_status_deltas": {"service_role": WRITE},
    "function ai_jobs_count_finished()": {},
    "function ai_jobs_count_truncated()": {},
    "function ai_job_fold_counts()": {"service_role": EXECUTE},
    "function ai_job_recount()": {"service_role": EXECUTE},
    "function ai_job_status_counts()": {"service_role": EXECUTE},
    "function ai_job_filter_sql(text,text,text,uuid,timestamp with time zone,"
    "timestamp with time zone,text)": {"service_role": EXECUTE},
    "function find_jobs(text,text,text,uuid,timestamp with time zone,timestamp with time zone,"
    "text,timestamp with time zone,uuid,integer)": {"service_role": EXECUTE},
    "function ai_job_bulk(text,text,text,text,uuid,timestamp with time zone,"
    "timestamp with time zone,text,boolean)": {"service_role": EXECUTE},
    "function requeue_jobs(text,text,text,uuid,timestamp with time zone,"
    "timestamp with time zone,text,boolean)": {"service_role": EXECUTE},
    "function cancel_jobs(text,text,text,uuid,timestamp with time zone,"
    "timestamp with time zone,text,boolean)": {"service_role": EXECUTE},
    "function delete_jobs(text,text,text,uuid,timestamp with time zone,"
    "timestamp with time zone,text,boolean)": {"service_role": EXECUTE},
    # sql/021
    "table ai_job_charges": {"service_role": {"SELECT", "INSERT", "DELETE"}},
    "sequence ai_job_charges_id_seq": {},
    "table ai_job_admissions": {"service_role": {"SELECT", "DELETE"}},
    "function ai_job_add_charges(text[],uuid[],text[],text[],bigint[],bigint[],bigint[],"
    "numeric[])": {"service_role": EXECUTE},
    "function ai_job_enforce_limits()": {},
    "function ai_media_jobs_defaults()": {},
    "function ai_job_release_course_ids(uuid[],text[])": {"service_role": EXECUTE},
    "function ai_job_reclaim_course_ids(uuid[])": {"service_role": EXECUTE},
    # sql/024
    "function ai_job_progress_guard()": {},
    "function ai_job_read_as_users(text[],uuid[],integer[])": {"service_role": EXECUTE},
    "function progress_jobs(text,uuid[],uuid[],jsonb[],jsonb[])": {"service_role": EXECUTE},
    # sql/023
    "table ai_job_provider_quotas": {"service_role": WRITE},
    "function ai_job_quota_limits(ai_job_provider_quotas,bigint[])": {"service_role": EXECUTE},
    "function ai_job_quota_levels(ai_job_provider_quotas,double precision[],"
    "timestamp with time zone)": {"service_role": EXECUTE},
    "function ai_job_quota_reserve(text,text,integer,double precision[],bigint[],"
    "double precision,integer)": {"service_role": EXECUTE},
    "function ai_job_quota_reset(text,text)": {"service_role": EXECUTE},
    # sql/037 (the settle of sql/023, sql/029 and sql/036, one argument more)
    "function ai_job_quota_settle(text,text,double precision[],bigint[],bigint[],bigint[],"
    "double precision,double precision,boolean,integer,boolean,double precision,"
    "double precision)": {"service_role": EXECUTE},
    "function ai_job_quota_share(ai_job_provider_quotas,timestamp with time zone)": {
        "service_role": EXECUTE
    },
    # sql/025
    "function ai_job_lock_users(uuid[])": {"service_role": EXECUTE},
    "function ai_job_running_by_user()": {"service_role": EXECUTE},
    "function ai_job_one_user_due(text)": {"service_role": EXECUTE},
    "function ai_job_due_users(text)": {"service_role": EXECUTE},
    "function ai_job_fair_pick(text,uuid[],integer,integer)": {"service_role": EXECUTE},
    "function ai_job_fair_pick_types(uuid[],integer,integer,text[],integer[])": {
        "service_role": EXECUTE
    },
    "function ai_job_fair_ids(text,integer,uuid[],text[],integer[])": {"service_role": EXECUTE},
    "function ai_job_under_cap(uuid)": {"service_role": EXECUTE},
    "function ai_job_settings_changed()": {},
    # sql/027
    "table ai_job_batches": {"service_role": WRITE},
    "table ai_job_batch_items": {"service_role": WRITE},
    "function ai_job_batch_take(text,uuid,uuid,text,double precision,integer)": {
        "service_role": EXECUTE
    },
    "function ai_job_batch_submitting(uuid,text,text,text)": {"service_role": EXECUTE},
    "function ai_job_batch_submitted(uuid,text,text,text)": {"service_role": EXECUTE},
    "function ai_job_batch_watch(text,double precision,integer,double precision)": {
        "service_role": EXECUTE
    },
    "function ai_job_batch_jobs(uuid,text)": {"service_role": EXECUTE},
    "function ai_job_batch_end(uuid,text,text,text)": {"service_role": EXECUTE},
    # sql/030
    "table ai_job_batch_queues": {"service_role": WRITE},
    "function ai_job_batch_enqueued(text,text,uuid)": {"service_role": EXECUTE},
    "function ai_job_batch_leave(uuid,text,uuid[],double precision,double precision,boolean)": {
        "service_role": EXECUTE
    },
    "function ai_job_batch_fit(uuid,text,text,text,text,uuid[],bigint[],double precision,"
    "double precision,double precision)": {"service_role": EXECUTE},
    "function ai_job_batch_refused(uuid,text,text,text,bigint,text,double precision,"
    "double precision,double precision)": {"service_role": EXECUTE},
}


# -- reading the catalogs ------------------------------------------------------

KINDS = {"r": "table", "p": "table", "v": "view", "m": "view", "S": "sequence", "f": "table"}

OBJECTS = """
select case c.relkind when 'S' then 'sequence' when 'v' then 'view' when 'm' then 'view'
                      else 'table' end || ' ' || c.relname as object,
       c.relrowsecurity as rls, c.relkind = any('{r,p,f}') as is_table
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind = any('{r,p,f,v,m,S}')
union all
select 'function ' || p.oid::regprocedure::text, null, false
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'public'
"""

GRANTS = """
select case c.relkind when 'S' then 'sequence' when 'v' then 'view' when 'm' then 'view'
                      else 'table' end || ' ' || c.relname as object,
       case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end as grantee,
       a.privilege_type as privilege
from pg_class c join pg_namespace n on n.oid = c.relnamespace,
     aclexplode(coalesce(c.relacl, acldefault(
         case when c.relkind = 'S' then 's' else 'r' end::"char", c.relowner))) a
where n.nspname = 'public' and c.relkind = any('{r,p,f,v,m,S}') and a.grantee <> c.relowner
union all
select case c.relkind when 'v' then 'view' when 'm' then 'view' else 'table' end
       || ' ' || c.relname,
       case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end,
       a.privilege_type || '(' || att.attname || ')'
from pg_attribute att
join pg_class c on c.oid = att.attrelid
join pg_namespace n on n.oid = c.relnamespace,
     aclexplode(att.attacl) a
where n.nspname = 'public' and att.attacl is not null and not att.attisdropped
  and a.grantee <> c.relowner
union all
select 'function ' || p.oid::regprocedure::text,
       case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end,
       a.privilege_type
from pg_proc p join pg_namespace n on n.oid = p.pronamespace,
     aclexplode(coalesce(p.proacl, acldefault('f'::"char", p.proowner))) a
where n.nspname = 'public' and a.grantee <> p.proowner
"""


def actual_grants(url: str) -> tuple[dict[str, dict[str, set[str]]], list[dict[str, Any]]]:
    with connect(url) as c:
        objects = c.execute(OBJECTS).fetchall()
        rows = c.execute(GRANTS).fetchall()
    found: dict[str, dict[str, set[str]]] = {o["object"]: {} for o in objects}
    for r in rows:
        found[r["object"]].setdefault(r["grantee"], set()).add(r["privilege"])
    return found, objects


def differences(found: dict[str, dict[str, set[str]]]) -> list[str]:
    problems = []
    for obj in sorted(found.keys() - ALLOWED.keys()):
        problems.append(
            f"{obj}: not in the allow-list of tests/integration/test_privileges.py "
            f"(grants now: {_show(found[obj])}); add it with the privileges each role needs"
        )
    for obj in sorted(ALLOWED.keys() - found.keys()):
        problems.append(f"{obj}: in the allow-list but not in the database (renamed or dropped?)")
    for obj in sorted(found.keys() & ALLOWED.keys()):
        have, allowed = found[obj], ALLOWED[obj]
        for role in sorted(have.keys() | allowed.keys()):
            extra = have.get(role, set()) - allowed.get(role, set())
            missing = allowed.get(role, set()) - have.get(role, set())
            for p in sorted(extra):
                problems.append(f"{obj}: {role} has {p}, which is not allowed")
            for p in sorted(missing):
                problems.append(f"{obj}: {role} lacks {p}, which it needs")
    return problems


def _show(grants: dict[str, set[str]]) -> str:
    return "; ".join(f"{r}: {', '.join(sorted(p))}" for r, p in sorted(grants.items())) or "none"


@pytest.mark.parametrize("kind", ["supabase", "plain"])
def test_every_object_has_exactly_the_allowed_privileges(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("supabase_db_url" if kind == "supabase" else "db_url")
    found, _ = actual_grants(url)
    problems = differences(found)
    assert not problems, "privileges differ from the allow-list:\n  " + "\n  ".join(problems)


def test_row_level_security_on_every_table(supabase_db_url: str) -> None:
    _, objects = actual_grants(supabase_db_url)
    without = [o["object"] for o in objects if o["is_table"] and not o["rls"]]
    assert not without, f"row-level security is not enabled on: {', '.join(without)}"


def test_the_check_reports_a_forgotten_grant_by_object_role_and_privilege(
    supabase_db_url: str,
) -> None:
    """What a migration that forgets the rule looks like to this test."""
    with connect(supabase_db_url) as c:
        c.execute("create table ai_job_forgotten (id int)")
        c.execute("create function ai_job_forgotten_fn() returns int language sql as 'select 1'")
        c.execute("grant delete on ai_course_catalog to anon")
        c.execute("revoke execute on function claim_jobs(text, text, integer) from service_role")
    problems = differences(actual_grants(supabase_db_url)[0])
    assert any(
        p.startswith("table ai_job_forgotten: not in the allow-list") and "anon: " in p
        for p in problems
    ), problems
    assert any(p.startswith("function ai_job_forgotten_fn(): not in the allow") for p in problems)
    assert "table ai_course_catalog: anon has DELETE, which is not allowed" in problems
    assert (
        "function claim_jobs(text,text,integer): service_role lacks EXECUTE, which it needs"
        in problems
    )


# -- search_path -------------------------------------------------------------------

UNPINNED = """
select p.oid::regprocedure::text as function,
       (select c from unnest(p.proconfig) c where c like 'search_path=%') as setting
from pg_proc p
where p.pronamespace = 'public'::regnamespace
order by 1
"""


def unpinned(url: str) -> list[str]:
    """Our functions whose search_path is not pinned to pg_catalog first and pg_temp
    last: whoever calls them could make a temp table, or a search_path of their own,
    stand in for a name they use."""
    with connect(url) as c:
        rows = c.execute(UNPINNED).fetchall()
    problems = []
    for r in rows:
        schemas = [s.strip() for s in (r["setting"] or "").removeprefix("search_path=").split(",")]
        if not r["setting"] or schemas[0] != "pg_catalog" or schemas[-1] != "pg_temp":
            problems.append(f"{r['function']}: {r['setting'] or 'no search_path'}")
    return problems


def test_every_function_pins_its_search_path(supabase_db_url: str) -> None:
    problems = unpinned(supabase_db_url)
    assert not problems, (
        "functions without `set search_path = pg_catalog, public, pg_temp`:\n  "
        + "\n  ".join(problems)
    )


def test_the_search_path_check_finds_a_function_that_forgot(supabase_db_url: str) -> None:
    with connect(supabase_db_url) as c:
        c.execute("create function ai_job_forgot() returns int language sql as 'select 1'")
        c.execute(
            "create function ai_job_half() returns int language sql"
            " set search_path = public, pg_temp as 'select 1'"
        )
    assert unpinned(supabase_db_url) == [
        "ai_job_forgot(): no search_path",
        "ai_job_half(): search_path=public, pg_temp",
    ]
