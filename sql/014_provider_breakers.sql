-- 014: the providers' breakers, shared by every worker; jobs that wait for them
-- without counting an attempt; the tokens and dollars every provider call spent.
--
-- A breaker per provider (ai_job_provider_state). Calls that say the provider is
-- unwell (5xx, 429/529, a timeout, a connection error) count as consecutive
-- failures; at the threshold the breaker opens for a cooldown, and a 429/529 that
-- says when to come back (retry-after) opens it for that long at once. An
-- authentication error or an unknown model opens it for a long time (kind
-- 'auth'): every call would fail alike. Once open_until has passed, the breaker
-- is half-open: one caller takes the probe (a lease in probe_until) and its call
-- decides, closed on an answer, open again on a failure. Workers read the rows
-- (a cache of about a second) and change them only through these functions, so
-- one worker's discovery spares the others.

create table if not exists ai_job_provider_state (
    provider             text primary key,
    consecutive_failures int not null default 0,
    open_until           timestamptz,  -- null: closed; past: half-open (a probe decides)
    cooldown_kind        text check (cooldown_kind in ('unwell', 'rate_limited', 'auth')),
    cooldown_reason      text,         -- the failure that opened it, scrubbed
    probe_until          timestamptz,  -- a probe call is in flight until then
    changed_at           timestamptz not null default now()
);

-- Since when a job waits for its providers (defer_job). Null while it never
-- waited; kept until the job is requeued, so a job that keeps waiting starts
-- counting attempts again after PROVIDER_OUTAGE_MAX_WAIT_SECONDS.
alter table ai_course_jobs add column if not exists provider_wait_since timestamptz;
alter table ai_media_jobs add column if not exists provider_wait_since timestamptz;

-- The state after a change, with the transition it made (for logging it once).
-- One call failed in a way that says the provider is unwell, or that every call
-- will fail (kind 'auth').
create or replace function ai_job_provider_failed(
    p_provider text, p_kind text, p_reason text, p_threshold int,
    p_cooldown_seconds double precision, p_retry_after_seconds double precision default null)
returns table(provider text, consecutive_failures int, open_until timestamptz,
              cooldown_kind text, cooldown_reason text, probe_until timestamptz,
              transition text)
language plpgsql
as $$
#variable_conflict use_column
declare
    s ai_job_provider_state;
    now_ timestamptz := clock_timestamp();
    new_until timestamptz;
    failures int;
    moved text;
begin
    if p_kind not in ('unwell', 'rate_limited', 'auth') then
        raise exception 'Unknown failure kind: %', p_kind using errcode = 'invalid_parameter_value';
    end if;
    insert into ai_job_provider_state as t (provider) values (p_provider) on conflict do nothing;
    select * into s from ai_job_provider_state t where t.provider = p_provider for update;
    failures := s.consecutive_failures + 1;
    new_until := s.open_until;
    if p_kind = 'auth' then
        new_until := now_ + make_interval(secs => p_cooldown_seconds);
    elsif p_retry_after_seconds is not null and p_retry_after_seconds > 0 then
        -- The provider said when: that long, or longer if it is already open longer.
        new_until := greatest(coalesce(s.open_until, now_), now_ + make_interval(secs => p_retry_after_seconds));
    elsif s.probe_until is not null or failures >= p_threshold then
        -- The probe failed, or too many in a row: open (again) for the cooldown.
        new_until := greatest(coalesce(s.open_until, now_), now_ + make_interval(secs => p_cooldown_seconds));
    end if;
    if new_until is not null and new_until > now_ then
        if s.open_until is null then
            moved := 'opened';
        elsif s.open_until <= now_ then
            moved := 'reopened';
        end if;
    end if;
    update ai_job_provider_state t
    set consecutive_failures = failures,
        open_until = new_until,
        cooldown_kind = case when new_until is distinct from s.open_until then p_kind else s.cooldown_kind end,
        cooldown_reason = case when new_until is distinct from s.open_until then left(p_reason, 500)
                               else s.cooldown_reason end,
        probe_until = null,
        changed_at = now_
    where t.provider = p_provider;
    return query
    select t.provider, t.consecutive_failures, t.open_until, t.cooldown_kind, t.cooldown_reason,
           t.probe_until, moved
    from ai_job_provider_state t where t.provider = p_provider;
end
$$;

-- The provider answered (even an answer that fails validation, or a refusal: a
-- provider that answers is up). Closes the breaker; writes only when there is
-- something to reset, and workers call it only when their copy says so.
create or replace function ai_job_provider_succeeded(p_provider text)
returns table(provider text, consecutive_failures int, open_until timestamptz,
              cooldown_kind text, cooldown_reason text, probe_until timestamptz,
              transition text)
language plpgsql
as $$
#variable_conflict use_column
declare
    was_open boolean;
begin
    select t.open_until is not null into was_open
    from ai_job_provider_state t where t.provider = p_provider for update;
    update ai_job_provider_state t
    set consecutive_failures = 0, open_until = null, cooldown_kind = null,
        cooldown_reason = null, probe_until = null, changed_at = clock_timestamp()
    where t.provider = p_provider
      and (t.consecutive_failures > 0 or t.open_until is not null or t.probe_until is not null);
    return query
    select t.provider, t.consecutive_failures, t.open_until, t.cooldown_kind, t.cooldown_reason,
           t.probe_until, case when was_open then 'closed' end
    from ai_job_provider_state t where t.provider = p_provider;
end
$$;

-- Half-open: the first caller after open_until takes the probe, a lease of
-- lease_seconds (a prober that dies frees it by itself). Returns the state and
-- whether this caller got the probe; a closed breaker returns probe = false
-- with open_until null (call freely).
create or replace function ai_job_provider_probe(p_provider text, lease_seconds double precision)
returns table(provider text, consecutive_failures int, open_until timestamptz,
              cooldown_kind text, cooldown_reason text, probe_until timestamptz,
              probe boolean)
language plpgsql
as $$
#variable_conflict use_column
declare
    got boolean := false;
begin
    update ai_job_provider_state t
    set probe_until = clock_timestamp() + make_interval(secs => lease_seconds)
    where t.provider = p_provider and t.open_until <= clock_timestamp()
      and (t.probe_until is null or t.probe_until <= clock_timestamp());
    got := found;
    return query
    select t.provider, t.consecutive_failures, t.open_until, t.cooldown_kind, t.cooldown_reason,
           t.probe_until, got
    from ai_job_provider_state t where t.provider = p_provider;
end
$$;

-- Operators: close a breaker by hand (a key was fixed), e.g.
--   select ai_job_provider_reset('openai');
create or replace function ai_job_provider_reset(p_provider text)
returns void
language sql
as $$
    update ai_job_provider_state
    set consecutive_failures = 0, open_until = null, cooldown_kind = null,
        cooldown_reason = null, probe_until = null, changed_at = clock_timestamp()
    where provider = p_provider
$$;

-- Every provider of the job's chain is down or rate-limited: back to pending,
-- due at the earliest recovery, without counting an attempt. The job remembers
-- since when it waits (provider_wait_since): a fresh job (no error yet: just
-- inserted or requeued) starts the clock; once it has waited longer than
-- max_wait_seconds, each deferral counts an attempt as fail_job does (failed,
-- or the dead letter at max_retries), so nothing waits forever. Token-checked
-- like fail_job: returns nothing when the job was taken away from this worker.
create or replace function defer_job(
    table_name text, job_id uuid, token uuid, wait_seconds double precision, reason text,
    max_wait_seconds double precision default 1800)
returns table(status text, retry_count int, run_after timestamptz, counted boolean)
language plpgsql
as $$
begin
    return query execute format($q$
        with w as (
            select id,
                   case when error is null then clock_timestamp()
                        else coalesce(provider_wait_since, clock_timestamp()) end as since
            from %1$I
            where id = $1 and claim_token = $2 and status in ('processing', 'stale')
            for update
        ), c as (
            select id, since, since < clock_timestamp() - make_interval(secs => $5) as counted
            from w
        )
        update %1$I j
        set retry_count = j.retry_count + case when c.counted then 1 else 0 end,
            status = case when not c.counted then 'pending'
                          when j.retry_count + 1 >= j.max_retries then 'dead_letter'
                          else 'failed' end,
            completed_at = case when c.counted and j.retry_count + 1 >= j.max_retries
                                then clock_timestamp() end,
            run_after = clock_timestamp() + make_interval(secs => greatest($3, 0)),
            error = left(case when c.counted
                              then coalesce($4, 'providers unavailable')
                                   || format(' (waiting since %%s, past the %%ss limit)',
                                             to_char(c.since, 'YYYY-MM-DD HH24:MI:SSOF'), $5)
                              else coalesce($4, 'providers unavailable') end, 2000),
            provider_wait_since = c.since,
            started_at = case when c.counted then j.started_at end,
            last_heartbeat = case when c.counted then j.last_heartbeat end,
            claim_token = null, worker_id = null
        from c
        where j.id = c.id
        returning j.status, j.retry_count, j.run_after, c.counted
    $q$, ai_job_table(table_name)) using job_id, token, wait_seconds, reason, max_wait_seconds;
end
$$;

-- Tokens and dollars per provider and model, for /metrics. Workers add what their
-- calls spent every few seconds (every call, failed attempts included), so this
-- is a real ever-growing counter; a job's own metrics keep its share.
create table if not exists ai_job_usage_totals (
    provider            text not null,
    model               text not null,  -- folded to 'other' beyond the known models
    calls               bigint not null default 0,
    input_tokens        bigint not null default 0,  -- cached ones included
    cached_input_tokens bigint not null default 0,
    output_tokens       bigint not null default 0,
    cost_usd            numeric not null default 0,
    updated_at          timestamptz not null default now(),
    primary key (provider, model)
);

create or replace function ai_job_add_usage(
    providers text[], models text[], calls bigint[], input_tokens bigint[],
    cached_input_tokens bigint[], output_tokens bigint[], costs numeric[])
returns void
language sql
as $$
    insert into ai_job_usage_totals as t
        (provider, model, calls, input_tokens, cached_input_tokens, output_tokens, cost_usd)
    select * from unnest(providers, models, calls, input_tokens, cached_input_tokens,
                         output_tokens, costs)
    on conflict (provider, model) do update
    set calls = t.calls + excluded.calls,
        input_tokens = t.input_tokens + excluded.input_tokens,
        cached_input_tokens = t.cached_input_tokens + excluded.cached_input_tokens,
        output_tokens = t.output_tokens + excluded.output_tokens,
        cost_usd = t.cost_usd + excluded.cost_usd,
        updated_at = now()
$$;

-- The provider_auth alert: a provider's breaker opened by an authentication
-- error or an unknown model.
insert into ai_job_alert_state (rule) values ('provider_auth') on conflict do nothing;

-- Least privilege: the worker and operators (service_role) only.
alter table ai_job_provider_state enable row level security;
alter table ai_job_usage_totals enable row level security;
revoke all on ai_job_provider_state, ai_job_usage_totals from public, anon, authenticated;
grant select, insert, update, delete on ai_job_provider_state, ai_job_usage_totals to service_role;
revoke execute on function
    ai_job_provider_failed(text, text, text, int, double precision, double precision),
    ai_job_provider_succeeded(text),
    ai_job_provider_probe(text, double precision),
    ai_job_provider_reset(text),
    defer_job(text, uuid, uuid, double precision, text, double precision),
    ai_job_add_usage(text[], text[], bigint[], bigint[], bigint[], bigint[], numeric[])
    from public, anon, authenticated;
grant execute on function
    ai_job_provider_failed(text, text, text, int, double precision, double precision),
    ai_job_provider_succeeded(text),
    ai_job_provider_probe(text, double precision),
    ai_job_provider_reset(text),
    defer_job(text, uuid, uuid, double precision, text, double precision),
    ai_job_add_usage(text[], text[], bigint[], bigint[], bigint[], bigint[], numeric[])
    to service_role;
