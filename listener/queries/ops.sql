-- The operator surface's statements: stuck jobs, alert rules, the dashboard and
-- /metrics. Each under a `-- name:` header (see db.queries()).

-- name: stuck_jobs
-- The runbook's "Find stuck jobs", for both tables: processing with an old heartbeat.
-- Labels are cut short: a subject or prompt is a client's text.
select job_table, id, label, started_at, last_heartbeat, worker_id,
       date_trunc('second', now() - coalesce(last_heartbeat, started_at)) as stale_for
from (
    select 'ai_course_jobs' as job_table, id, left(subject, 200) as label, started_at,
           last_heartbeat, worker_id
    from ai_course_jobs
    where status = 'processing'
      and coalesce(last_heartbeat, started_at, created_at) < now() - make_interval(secs => %(seconds)s)
    union all
    select 'ai_media_jobs', id, left(prompt, 200), started_at, last_heartbeat, worker_id
    from ai_media_jobs
    where status = 'processing'
      and coalesce(last_heartbeat, started_at, created_at) < now() - make_interval(secs => %(seconds)s)
) stuck
order by coalesce(last_heartbeat, started_at) asc
limit 500

-- name: alert_values
-- One row with the value of each alert rule except the rejection counter.
-- "In the last hour" means: finished (done, dead_letter) or last attempted
-- (failed, whose started_at is the failing attempt's start) within the hour.
with recent as (
    select status, started_at, completed_at from ai_course_jobs
    where (status in ('done', 'dead_letter') and completed_at > now() - interval '1 hour')
       or status = 'failed'
    union all
    select status, started_at, completed_at from ai_media_jobs
    where (status in ('done', 'dead_letter') and completed_at > now() - interval '1 hour')
       or status = 'failed'
), hour as (
    select * from recent
    where status <> 'failed' or started_at > now() - interval '1 hour'
)
select
    (select count(*) from hour where status = 'dead_letter') as dead_letter_last_hour,
    (select count(*) from ai_course_jobs
      where (status = 'processing'
             and coalesce(last_heartbeat, started_at, created_at)
                 < now() - make_interval(secs => %(stale_seconds)s))
         or status = 'stale')
    + (select count(*) from ai_media_jobs
      where (status = 'processing'
             and coalesce(last_heartbeat, started_at, created_at)
                 < now() - make_interval(secs => %(stale_seconds)s))
         or status = 'stale') as stale_processing,
    (select count(*) from ai_course_jobs where status = 'pending')
    + (select count(*) from ai_media_jobs where status = 'pending') as pending_depth,
    (select round(avg(extract(epoch from completed_at - started_at))::numeric, 2)::float8
       from hour where status = 'done') as avg_processing_time,
    (select round(100.0 * count(*) filter (where status in ('failed', 'dead_letter'))
                  / nullif(count(*), 0), 2)::float8
       from hour) as failure_rate

-- name: rate_limit_rejections
-- The rejection counter: a sequence, so rejected inserts that rolled back still count.
select case when is_called then last_value else 0 end as value
from ai_job_rate_limit_rejections

-- name: record_counter_sample
insert into ai_job_counter_samples (counter, value)
values (%(counter)s, %(value)s)
on conflict do nothing

-- name: counter_baseline
-- The sample taken about an hour ago: the newest one at least an hour old, or
-- else the oldest one there is.
select value from (
    (select value, 0 as rank from ai_job_counter_samples
     where counter = %(counter)s and sampled_at <= now() - interval '1 hour'
     order by sampled_at desc limit 1)
    union all
    (select value, 1 from ai_job_counter_samples
     where counter = %(counter)s
     order by sampled_at asc limit 1)
) s
order by rank
limit 1

-- name: prune_counter_samples
-- Keep a little more than the hour the rate-limit rule looks back on, and a
-- little more than the day the queue-depth chart shows.
delete from ai_job_counter_samples
where sampled_at < now() - case when left(counter, 6) = 'queue_' then interval '25 hours'
                                else interval '2 hours' end

-- name: live_depth
-- Pending and processing jobs of both tables (partial indexes), for the chart.
select coalesce(sum(jobs) filter (where status = 'pending'), 0) as pending,
       coalesce(sum(jobs) filter (where status = 'processing'), 0) as processing
from ai_job_status_counts()
where status in ('pending', 'processing')

-- name: job_metrics
-- What the runbook's ai_job_metrics view says (count and average duration per job
-- type and status), from sources that do not grow with history (sql/017). The
-- view itself scans both tables: it stays for psql.
select case job_table when 'ai_course_jobs' then 'course' else 'media' end as job_type,
       status, jobs as count, avg_duration_seconds
from ai_job_status_counts()
order by job_type, status

-- name: recent_jobs
-- The dashboard's table: the newest jobs of both tables (each side uses its
-- created_at index and stops at the limit). Texts are cut to what the page shows.
select * from (
    (select 'ai_course_jobs' as job_table, 'course' as job_type, id, left(subject, 200) as label,
            status, retry_count, max_retries, left(error, 500) as error, created_at, started_at,
            completed_at, extract(epoch from completed_at - started_at)::float8 as duration_seconds,
            left(metrics ->> 'provider', 40) as provider
     from ai_course_jobs order by created_at desc limit %(limit)s)
    union all
    (select 'ai_media_jobs', 'media', id, left(prompt, 200), status,
            retry_count, max_retries, left(error, 500), created_at, started_at, completed_at,
            extract(epoch from completed_at - started_at)::float8,
            left(metrics ->> 'provider', 40)
     from ai_media_jobs order by created_at desc limit %(limit)s)
) jobs
order by created_at desc, id
limit %(limit)s

-- name: duration_quantiles
-- Job durations of the last hour, per job type, for /metrics.
select job_type,
       count(*) as count,
       coalesce(sum(seconds), 0)::float8 as sum,
       percentile_cont(0.5) within group (order by seconds)::float8 as p50,
       percentile_cont(0.9) within group (order by seconds)::float8 as p90,
       percentile_cont(0.99) within group (order by seconds)::float8 as p99
from (
    select 'course' as job_type, extract(epoch from completed_at - started_at) as seconds
    from ai_course_jobs where status = 'done' and completed_at > now() - interval '1 hour'
    union all
    select 'media', extract(epoch from completed_at - started_at)
    from ai_media_jobs where status = 'done' and completed_at > now() - interval '1 hour'
) d
group by job_type

-- name: provider_latency
-- Generation time per provider over the last hour, from the jobs' metrics. The
-- label set is bounded: a provider not in %(providers)s counts as 'other'
-- (metrics are written by the worker, but a label must never come from a row).
-- The database keeps metrics numbers within +-1e300 (sql/011): the cast is safe.
select provider,
       count(*) as count,
       percentile_cont(0.5) within group (order by ms)::float8 / 1000 as p50,
       percentile_cont(0.9) within group (order by ms)::float8 / 1000 as p90,
       percentile_cont(0.99) within group (order by ms)::float8 / 1000 as p99
from (
    select metrics ->> 'provider' as name, (metrics -> 'generationDurationMs')::float8 as ms
    from ai_course_jobs
    where status = 'done' and completed_at > now() - interval '1 hour'
      and metrics ? 'provider' and jsonb_typeof(metrics -> 'generationDurationMs') = 'number'
    union all
    select metrics ->> 'provider', (metrics -> 'generationDurationMs')::float8
    from ai_media_jobs
    where status = 'done' and completed_at > now() - interval '1 hour'
      and metrics ? 'provider' and jsonb_typeof(metrics -> 'generationDurationMs') = 'number'
) p,
lateral (select case when p.name = any(%(providers)s::text[]) then p.name else 'other' end
         as provider) folded
group by provider
order by provider

-- name: failures_last_hour
-- Attempts that failed in the last hour (those that sent their job to the dead
-- letter included), from the attempts' end-time index: a window, not the history.
select case job_table when 'ai_course_jobs' then 'course' else 'media' end as job_type,
       count(*) as count
from ai_job_attempts
where ended_at > now() - interval '1 hour' and outcome in ('failed', 'lost')
group by job_table

-- name: listen_events
-- The dashboard's channel (triggers/007); payload: the table name.
listen ai_jobs_events

-- name: list_jobs
-- The runbook's diagnosis queries in one: jobs of a status (or all), newest
-- activity first, with their error and heartbeat age.
select * from (
    (select 'ai_course_jobs' as job_table, id, left(subject, 200) as label, status, retry_count,
            max_retries,
            date_trunc('second', now() - last_heartbeat) as heartbeat_age,
            coalesce(completed_at, last_heartbeat, created_at) as last_activity, error
     from ai_course_jobs
     where %(status)s::text is null or status = %(status)s::text
     order by coalesce(completed_at, last_heartbeat, created_at) desc limit %(limit)s)
    union all
    (select 'ai_media_jobs', id, left(prompt, 200), status, retry_count, max_retries,
            date_trunc('second', now() - last_heartbeat),
            coalesce(completed_at, last_heartbeat, created_at), error
     from ai_media_jobs
     where %(status)s::text is null or status = %(status)s::text
     order by coalesce(completed_at, last_heartbeat, created_at) desc limit %(limit)s)
) jobs
order by last_activity desc
limit %(limit)s

-- name: rate_limit_usage
-- The runbook's "Check rate limit violations": who submitted how much in the
-- last hour, per table, against the limit the database enforces.
select job_table, created_by, jobs_last_hour,
       (select rate_limit_per_hour from ai_job_settings) as rate_limit
from (
    select 'ai_course_jobs' as job_table, created_by, count(*) as jobs_last_hour
    from ai_course_jobs
    where created_by is not null and created_at > now() - interval '1 hour'
    group by created_by
    union all
    select 'ai_media_jobs', created_by, count(*)
    from ai_media_jobs
    where created_by is not null and created_at > now() - interval '1 hour'
    group by created_by
) usage
order by jobs_last_hour desc, job_table, created_by
limit 100

-- name: alert_transition
-- Returns the rule when this call changed its state (see sql/008_alert_state.sql):
-- of several workers evaluating at once, one gets the row.
insert into ai_job_alert_state as s (rule, firing, value)
values (%(rule)s, %(firing)s, %(value)s)
on conflict (rule) do update
    set firing = excluded.firing, value = excluded.value, changed_at = now()
    where s.firing is distinct from excluded.firing
returning rule
