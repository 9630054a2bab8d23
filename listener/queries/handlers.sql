-- Statements of the generation handlers: the course catalog and the course cache.

-- name: catalog_upsert
-- A regenerated course replaces its entry; created_at keeps the first time.
insert into ai_course_catalog as c
    (course_id, job_id, subject, title, description, level, language, group_count,
     item_count, result_path, cache_key, provider, model)
values (%(course_id)s, %(job_id)s, %(subject)s, %(title)s, %(description)s, %(level)s,
        %(language)s, %(group_count)s, %(item_count)s, %(result_path)s, %(cache_key)s,
        %(provider)s, %(model)s)
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
-- The newest course made from the same request within the TTL, by a real provider
-- (rows saved before placeholder courses stopped being cached are passed over).
select course_id, job_id, result_path, provider, model
from ai_course_catalog
where cache_key = %(cache_key)s and updated_at > now() - make_interval(secs => %(ttl)s)
  and provider is distinct from 'placeholder'
order by updated_at desc
limit 1
