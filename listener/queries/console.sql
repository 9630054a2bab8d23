-- The operators' console beyond the runbook: finding jobs, one job in full, bulk
-- actions, charts and cost. Each under a `-- name:` header (see db.queries()).
-- Every read here is bounded: an index walk that stops at a page, or a window of
-- time on an index of completion times.

-- name: find_jobs
-- One page, newest first; sql/017's find_jobs plans each filter for its values.
select job_table, job_type, id, label, job_status as status, retry_count, max_retries, error,
       created_by, created_at, started_at, completed_at, duration_seconds,
       job_provider as provider
from find_jobs(%(table)s, %(status)s, %(provider)s, %(user)s, %(created_after)s,
               %(created_before)s, %(search)s, %(cursor_created_at)s, %(cursor_id)s,
               %(page_size)s)

-- name: bulk_jobs
-- requeue, cancel or delete what a filter selects (sql/017); dry_run: the count only.
select ai_job_bulk(%(action)s, %(table)s, %(status)s, %(provider)s, %(user)s,
                   %(created_after)s, %(created_before)s, %(search)s, %(dry_run)s) as n

-- name: job_detail
-- One job of either table, whole.
select 'ai_course_jobs' as job_table, 'course' as job_type, id, subject as label, status, params,
       retry_count, max_retries, error, created_by, created_at, run_after, started_at,
       last_heartbeat, completed_at, result_path, metrics, worker_id, course_id,
       null::text as media_type
from ai_course_jobs where id = %(id)s
union all
select 'ai_media_jobs', 'media', id, prompt, status, params,
       retry_count, max_retries, error, created_by, created_at, run_after, started_at,
       last_heartbeat, completed_at, result_path, metrics, worker_id, course_id, media_type
from ai_media_jobs where id = %(id)s

-- name: job_attempts
-- The attempts of one job that did not succeed, oldest first (sql/016).
select attempt, worker_id, started_at, ended_at, outcome, next_status, error,
       extract(epoch from ended_at - started_at)::float8 as duration_seconds
from ai_job_attempts
where job_id = %(id)s and job_table = %(table)s
order by ended_at, id

-- name: chart_finished
-- Jobs done per bucket, with duration and wait (created -> started) quantiles,
-- from the completion-time index (a window of time, not the history).
select date_bin(%(bucket)s::interval, completed_at, timestamptz 'epoch') as t,
       count(*) as done,
       percentile_cont(0.5) within group (order by seconds)::float8 as p50,
       percentile_cont(0.95) within group (order by seconds)::float8 as p95,
       percentile_cont(0.5) within group (order by wait)::float8 as wait_p50,
       percentile_cont(0.95) within group (order by wait)::float8 as wait_p95
from (
    select completed_at, extract(epoch from completed_at - started_at) as seconds,
           extract(epoch from started_at - created_at) as wait
    from ai_course_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
    union all
    select completed_at, extract(epoch from completed_at - started_at),
           extract(epoch from started_at - created_at)
    from ai_media_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
) d
group by 1
order by 1

-- name: chart_failed
-- Attempts that failed (or were lost with their worker) per bucket.
select date_bin(%(bucket)s::interval, ended_at, timestamptz 'epoch') as t, count(*) as failed
from ai_job_attempts
where ended_at > now() - %(window)s::interval and outcome in ('failed', 'lost')
group by 1
order by 1

-- name: chart_depth
-- Queue depth as the workers sample it each minute (alerts.record_samples).
select date_bin(%(bucket)s::interval, sampled_at, timestamptz 'epoch') as t,
       max(value) filter (where counter = 'queue_pending') as pending,
       max(value) filter (where counter = 'queue_processing') as processing
from ai_job_counter_samples
where sampled_at > now() - %(window)s::interval
  and counter in ('queue_pending', 'queue_processing')
group by 1
order by 1

-- name: cost_by_hour
-- Spend and tokens per hour and provider over the window, from the jobs' metrics.
select date_trunc('hour', completed_at) as hour, provider,
       count(*) as jobs,
       coalesce(sum(input_tokens), 0)::bigint as input_tokens,
       coalesce(sum(output_tokens), 0)::bigint as output_tokens,
       coalesce(sum(cached_tokens), 0)::bigint as cached_input_tokens,
       coalesce(sum(cost), 0)::float8 as cost_usd
from (
    select completed_at, metrics ->> 'provider' as provider,
           (metrics ->> 'inputTokens')::numeric as input_tokens,
           (metrics ->> 'outputTokens')::numeric as output_tokens,
           (metrics ->> 'cachedInputTokens')::numeric as cached_tokens,
           (metrics ->> 'estimatedCostUsd')::numeric as cost
    from ai_course_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
      and metrics ? 'provider'
    union all
    select completed_at, metrics ->> 'provider',
           (metrics ->> 'inputTokens')::numeric, (metrics ->> 'outputTokens')::numeric,
           (metrics ->> 'cachedInputTokens')::numeric, (metrics ->> 'estimatedCostUsd')::numeric
    from ai_media_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
      and metrics ? 'provider'
) m
group by 1, 2
order by 1, 2

-- name: cost_top_users
-- Who spent the most over the window (jobs without a user are the system's).
select created_by, count(*) as jobs,
       coalesce(sum((metrics ->> 'inputTokens')::numeric), 0)::bigint
       + coalesce(sum((metrics ->> 'outputTokens')::numeric), 0)::bigint as tokens,
       coalesce(sum((metrics ->> 'estimatedCostUsd')::numeric), 0)::float8 as cost_usd
from (
    select created_by, metrics from ai_course_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
    union all
    select created_by, metrics from ai_media_jobs
    where status = 'done' and completed_at > now() - %(window)s::interval
) m
group by created_by
order by cost_usd desc, jobs desc
limit %(limit)s
