-- Statements of the generation handlers: the course catalog and the course cache.

-- name: catalog_upsert
-- Many courses in one statement and one commit (the catalog saves in batches):
-- %(rows)s is a JSON array of rows, one per course_id at most (the caller keeps
-- a course's latest). Rows go in course_id order, so that two processes saving
-- overlapping batches take the row locks in one order. A regenerated course
-- replaces its entry; created_at keeps the first time.
insert into ai_course_catalog as c
    (course_id, job_id, subject, title, description, level, language, group_count,
     item_count, result_path, cache_key, provider, model)
select r.course_id, r.job_id, r.subject, r.title, r.description, r.level, r.language,
       r.group_count, r.item_count, r.result_path, r.cache_key, r.provider, r.model
from jsonb_to_recordset(%(rows)s::jsonb) as r(
    course_id text, job_id uuid, subject text, title text, description text, level text,
    language text, group_count int, item_count int, result_path text, cache_key text,
    provider text, model text)
order by r.course_id
on conflict (course_id) do update
set job_id = excluded.job_id, subject = excluded.subject, title = excluded.title,
    description = excluded.description, level = excluded.level,
    language = excluded.language, group_count = excluded.group_count,
    item_count = excluded.item_count, result_path = excluded.result_path,
    cache_key = excluded.cache_key, provider = excluded.provider, model = excluded.model,
    updated_at = now()

-- name: catalog_render_lock
-- Renders take turns (held to the end of the render's transaction), so that a
-- render that read fewer rows never overwrites the file after one that read more.
select pg_advisory_xact_lock(hashtext('ai-jobs catalog render'))

-- name: catalog_rows
select course_id, job_id, subject, title, description, level, language, group_count,
       item_count, result_path, provider, model, created_at, updated_at
from ai_course_catalog
order by course_id

-- name: course_cache_lookup
-- For each request key, the newest course made from it within the TTL, by a real
-- provider (rows saved before placeholder courses stopped being cached are passed
-- over). The keys of jobs that start together are looked up in one statement.
select distinct on (c.cache_key)
       c.cache_key, c.course_id, c.job_id, c.result_path, c.provider, c.model
from ai_course_catalog c
where c.cache_key = any(%(keys)s::text[])
  and c.updated_at > now() - make_interval(secs => %(ttl)s)
  and c.provider is distinct from 'placeholder'
order by c.cache_key, c.updated_at desc

-- name: staged_results
-- The jobs of results staged under their attempt's own key (listener/results.py),
-- each found by primary key: whether that attempt still holds the claim, what the
-- job's completion stored (its digest), and whether another job's course now owns
-- the path (the catalog row of a course names the job whose result it lists).
-- A staged key whose job is gone comes back with a null status.
select s.id, s.token, j.status, coalesce(j.claim_token = s.token, false) as running,
       j.result_path, j.metrics ->> 'resultSha256' as sha256,
       coalesce(j.job_table = 'ai_course_jobs' and exists (
           select 1 from ai_course_catalog c
           where c.course_id = split_part(j.result_path, '/', 2) and c.job_id <> s.id
       ), false) as superseded
from unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) as s(id, token)
left join lateral (
    select 'ai_course_jobs' as job_table, status, claim_token, result_path, metrics
    from ai_course_jobs where id = s.id
    union all
    select 'ai_media_jobs', status, claim_token, result_path, metrics
    from ai_media_jobs where id = s.id
) j on true
