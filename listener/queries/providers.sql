-- The providers' breakers, deferred jobs and usage totals (sql/014_provider_breakers.sql).
-- Each under a `-- name:` header (see db.queries()). db_now lets a worker turn the
-- database's timestamps into its own monotonic clock, whatever its host's clock says.

-- name: provider_states
select provider, consecutive_failures, open_until, cooldown_kind, cooldown_reason, probe_until,
       clock_timestamp() as db_now
from ai_job_provider_state

-- name: provider_failed
select s.*, clock_timestamp() as db_now
from ai_job_provider_failed(%(provider)s, %(kind)s, %(reason)s, %(threshold)s, %(cooldown)s,
                            %(retry_after)s) s

-- name: provider_succeeded
select s.*, clock_timestamp() as db_now from ai_job_provider_succeeded(%(provider)s) s

-- name: provider_probe
select s.*, clock_timestamp() as db_now from ai_job_provider_probe(%(provider)s, %(lease)s) s

-- name: provider_forget_auth
select provider, ai_job_provider_reset(provider)
from ai_job_provider_state
where cooldown_kind = 'auth' and provider = any(%(providers)s::text[])

-- name: defer_job
select status, retry_count, counted,
       extract(epoch from run_after - clock_timestamp())::float8 as due_in
from defer_job(%(table)s, %(id)s, %(token)s, %(wait)s, %(reason)s, %(max_wait)s)

-- name: add_usage
select ai_job_add_usage(%(providers)s::text[], %(models)s::text[], %(calls)s::bigint[],
                        %(input)s::bigint[], %(cached)s::bigint[], %(output)s::bigint[],
                        %(costs)s::numeric[])

-- name: add_call_histograms
-- sql/028: the calls' token and duration histograms observed since the last tick.
select ai_job_add_call_histograms(%(metrics)s::text[], %(operations)s::text[],
                                  %(providers)s::text[], %(models)s::text[],
                                  %(token_types)s::text[], %(counts)s::text[],
                                  %(sums)s::float8[], %(totals)s::bigint[])

-- name: call_histograms
-- /metrics: the GenAI histograms (sql/028).
select metric, operation, provider, model, token_type, counts, sum, count
from ai_job_call_histograms
order by metric, operation, provider, model, token_type

-- name: add_charges
-- Each provider call made for a job, as it returns (sql/021: the budget's spend).
select ai_job_add_charges(%(tables)s::text[], %(ids)s::uuid[], %(providers)s::text[],
                          %(models)s::text[], %(input)s::bigint[], %(cached)s::bigint[],
                          %(output)s::bigint[], %(costs)s::numeric[])

-- name: providers_refusing_auth
-- The provider_auth alert: breakers opened by a 401/403/404 and not closed since
-- by an answer (a probe, or ai_job_provider_reset).
select count(*) as count from ai_job_provider_state where cooldown_kind = 'auth'

-- name: provider_breakers
-- /metrics: 1 while a breaker is not closed (open, or half-open awaiting its probe).
select provider, (open_until is not null)::int as open from ai_job_provider_state

-- name: usage_totals
-- /metrics: what every provider call spent (ai_job_add_usage), by provider and model.
select provider, model, input_tokens, cached_input_tokens, output_tokens, cost_usd::float8 as cost_usd
from ai_job_usage_totals
order by provider, model

-- name: quota_reserve
-- sql/023: up to n calls of a model, each of the cost {requests, tokens, input, output}.
select granted, wait_seconds, metered, learning, too_big
from ai_job_quota_reserve(%(provider)s, %(model)s, %(n)s, %(cost)s::float8[], %(caps)s::bigint[],
                          %(lease)s, %(learners)s)

-- name: quota_settle
-- sql/023, sql/036, sql/037: a call settled from its answer, or reservations given
-- back unused.
select metered
from ai_job_quota_settle(%(provider)s, %(model)s, %(back)s::float8[], %(caps)s::bigint[],
                         %(limits)s::bigint[], %(remaining)s::bigint[], %(age)s, %(window)s,
                         %(heard)s, %(learning)s, %(limited)s, %(reserved)s,
                         %(window_error)s)
