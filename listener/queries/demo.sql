-- Statements of `ai-jobs demo`.

-- name: demo_jobs
select 'course' as kind, id, subject as title, status, retry_count, max_retries, error,
       result_path, round(extract(epoch from completed_at - started_at)::numeric, 2) as seconds,
       created_at
from ai_course_jobs
where id = any(%(ids)s)
union all
select 'media ' || media_type, id, prompt, status, retry_count, max_retries, error,
       result_path, round(extract(epoch from completed_at - started_at)::numeric, 2), created_at
from ai_media_jobs
where id = any(%(ids)s)
order by created_at, title

-- name: demo_drop_database
drop database if exists ai_jobs_demo with (force)

-- name: demo_create_database
create database ai_jobs_demo
