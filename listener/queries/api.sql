-- The end-user API (listener/web/api.py). Each statement runs inside userjobs.as_user:
-- a transaction of role authenticated with the token's claims, as PostgREST runs
-- a request, so row-level security, the column grants, the rate limit and the
-- budget decide what happens. Each under a `-- name:` header.

-- name: api_as_user
-- set_config('role', ..., true) is SET LOCAL ROLE (PostgREST's own way): one
-- round trip for the role, the claims and a statement timeout, all undone at the
-- transaction's end.
select set_config('role', 'authenticated', true) as role,
       set_config('request.jwt.claims', %(claims)s, true) as claims,
       set_config('statement_timeout', %(statement_timeout)s, true) as statement_timeout

-- name: api_create_course
insert into ai_course_jobs (subject, params, course_id, batch, trace_parent, created_by)
values (%(subject)s, %(params)s, %(course_id)s, %(batch)s, %(trace_parent)s, auth.uid())
returning id, status

-- name: api_create_media
insert into ai_media_jobs (prompt, media_type, params, course_id, batch, trace_parent,
                           created_by)
values (%(prompt)s, %(media_type)s, %(params)s, %(course_id)s, %(batch)s, %(trace_parent)s,
        auth.uid())
returning id, status

-- name: api_jobs
-- The jobs of these ids that the caller may see (their own), from either table.
select id, 'ai_course_jobs' as job_table, status, progress, partial_result, result_path,
       error, created_at, completed_at
from ai_course_jobs where id = any(%(ids)s::uuid[])
union all
select id, 'ai_media_jobs', status, progress, null::jsonb, result_path, error, created_at,
       completed_at
from ai_media_jobs where id = any(%(ids)s::uuid[])

-- name: api_read_as_users
-- The event streams' read (streams.py): many users' jobs in one statement, each
-- user's read as role authenticated with their claims (sql/024).
select reader, id, job_table, status, progress, partial_result, result_path, error,
       created_at, completed_at
from ai_job_read_as_users(%(claims)s::text[], %(ids)s::uuid[], %(readers)s::int[])

-- name: api_check_role
-- At start: the API's connections may act as authenticated (a member of it).
select pg_has_role(current_user, 'authenticated', 'MEMBER') as ok
