-- Budgets and costs (sql/015_budgets.sql). Each under a `-- name:` header.

-- name: budget_rejections
-- The budget's rejection counter: a sequence, so rejected inserts that rolled back still count.
select case when is_called then last_value else 0 end as value
from ai_job_budget_rejections

-- name: set_daily_budget
update ai_job_settings set daily_budget_usd_per_user = %(budget)s

-- name: costs
-- `ai-jobs costs`: what the done jobs created in the last N days spent, from their
-- metrics, grouped by user, model or day. A job without a price (an unknown
-- model) counts in `jobs` and `unpriced`, not in `cost_usd`.
with j as (
    select created_by, created_at, metrics from ai_course_jobs
    where status = 'done' and created_at > now() - make_interval(secs => %(days)s * 86400.0)
    union all
    select created_by, created_at, metrics from ai_media_jobs
    where status = 'done' and created_at > now() - make_interval(secs => %(days)s * 86400.0)
), n as (
    select case %(by)s::text
               when 'user' then coalesce(created_by::text, 'system')
               when 'day' then to_char(created_at at time zone 'UTC', 'YYYY-MM-DD')
               else coalesce(metrics ->> 'provider', '?') || ' ' || coalesce(metrics ->> 'model', '?')
                    -- generated through a provider's Batch API: priced apart (half)
                    || case when metrics -> 'batch' = 'true'::jsonb then ' (batch)' else '' end
           end as key,
           case when jsonb_typeof(metrics -> 'inputTokens') = 'number'
                then (metrics ->> 'inputTokens')::numeric end as input_tokens,
           case when jsonb_typeof(metrics -> 'cachedInputTokens') = 'number'
                then (metrics ->> 'cachedInputTokens')::numeric end as cached_input_tokens,
           case when jsonb_typeof(metrics -> 'outputTokens') = 'number'
                then (metrics ->> 'outputTokens')::numeric end as output_tokens,
           case when jsonb_typeof(metrics -> 'estimatedCostUsd') = 'number'
                then (metrics ->> 'estimatedCostUsd')::numeric end as cost
    from j
)
select key,
       count(*) as jobs,
       coalesce(sum(input_tokens), 0)::bigint as input_tokens,
       coalesce(sum(cached_input_tokens), 0)::bigint as cached_input_tokens,
       coalesce(sum(output_tokens), 0)::bigint as output_tokens,
       round(coalesce(sum(cost), 0), 6)::float8 as cost_usd,
       count(*) filter (where cost is null) as unpriced
from n
group by key
order by cost_usd desc, key
limit 1000
