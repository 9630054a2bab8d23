-- 023: the providers' quotas, shared by every worker (docs/generation.md,
-- "Provider quotas").
--
-- One row per (provider, model): OpenAI's limits are per model, Anthropic's per
-- model class, and a key's images and speech have limits of their own. Each
-- quota kind (requests, tokens, input_tokens, output_tokens) is a token bucket
-- as the providers describe theirs: it holds up to its limit and refills
-- continuously at limit / window_seconds. A kind's limit is the lower of what
-- the provider's rate-limit headers said (rpm, tpm, itpm, otpm: learned) and the
-- worker's PROVIDER_LIMITS (passed with each call: the caps live in the
-- workers' settings, not here); a kind with neither is not metered.
--
-- A worker reserves a call before it makes it (ai_job_quota_reserve: a request
-- and the call's estimated tokens, taken from the buckets, or a wait) and
-- settles it from the answer (ai_job_quota_settle: what the estimate held
-- beyond what the provider counted goes back; the limits and the window are
-- learned from the answer's headers; a level the provider says is lower is
-- lowered, so another user of the key, or a 429, corrects what we believed).
-- One statement each. A worker that dies between the two loses nothing: the
-- buckets refill by themselves.
--
-- Before any answer has stated a model's limits (and without caps), a few calls
-- at a time are let through to learn them (p_learners: the workers pass the
-- breaker's threshold, so that a provider that hangs is found as fast as
-- without quotas; learning_until is their lease, like the breakers' probe);
-- after an answer without rate-limit headers the model is not metered.
--
-- A reservation never passes a call that does not fit, and never charges one
-- that was refused: the wait it returns is the time until one more call of
-- that size fits. Settling may leave a level below zero (a call that cost more
-- than its estimate): the refill pays that back before the next call.

create table if not exists ai_job_provider_quotas (
    provider       text not null,
    model          text not null,
    -- limits per window, as the provider's headers last stated them
    rpm            bigint check (rpm > 0),
    tpm            bigint check (tpm > 0),
    itpm           bigint check (itpm > 0),
    otpm           bigint check (otpm > 0),
    -- the buckets' levels as of refilled_at (null: not metered)
    requests       double precision,
    tokens         double precision,
    input_tokens   double precision,
    output_tokens  double precision,
    -- the limits are per this many seconds: a minute for the real providers,
    -- learned from the headers' reset times (a test's fake may shrink it)
    window_seconds double precision not null default 60
                   check (window_seconds >= 1 and window_seconds <= 60),
    refilled_at    timestamptz not null default clock_timestamp(),
    learned_at     timestamptz,  -- the last answer read; null: none yet
    learning_until timestamptz,  -- calls that learn the limits are in flight until then
    learning_calls int not null default 0,  -- how many
    limited_at     timestamptz,  -- the last 429 despite a reservation
    primary key (provider, model)
);

-- The effective limits, by kind (requests, tokens, input_tokens, output_tokens):
-- the lower of the learned one and the cap; null where neither is known.
create or replace function ai_job_quota_limits(q ai_job_provider_quotas, caps bigint[])
returns double precision[]
language sql
immutable
set search_path = pg_catalog, public, pg_temp
as $$
    select array[least(q.rpm, caps[1]), least(q.tpm, caps[2]),
                 least(q.itpm, caps[3]), least(q.otpm, caps[4])]::double precision[]
$$;

-- The levels at `at`: refilled since refilled_at at limit / window per second, up
-- to the limit; a kind newly metered starts full; an unmetered kind is null.
create or replace function ai_job_quota_levels(
    q ai_job_provider_quotas, lim double precision[], at timestamptz)
returns double precision[]
language sql
immutable
set search_path = pg_catalog, public, pg_temp
as $$
    select array_agg(
               case when lim[k] is null then null
                    else least(lim[k], coalesce(lvl[k], lim[k])
                               + greatest(0, extract(epoch from at - q.refilled_at))
                                 * lim[k] / q.window_seconds) end
               order by k)
    from (select array[q.requests, q.tokens, q.input_tokens, q.output_tokens]) l(lvl),
         generate_series(1, 4) k
$$;

-- Reserve p_calls calls of p_cost each ({requests, tokens, input_tokens,
-- output_tokens}): as many as fit now (a worker asks for several at once for the
-- jobs it is about to claim, one for a call of its own). Returns how many were
-- granted; when fewer than asked, wait_seconds until one more fits; metered
-- false when no limit applies (every call granted, nothing written); learning
-- while the first calls learn the limits (up to p_learners at once; a grant is
-- one of them; wait_seconds the lease); too_big when one call needs more than a
-- limit (it never fits).
create or replace function ai_job_quota_reserve(
    p_provider text, p_model text, p_calls int, p_cost double precision[], p_caps bigint[],
    p_lease_seconds double precision, p_learners int default 1)
returns table(granted int, wait_seconds double precision, metered boolean, learning boolean,
              too_big boolean)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    q ai_job_provider_quotas;
    now_ timestamptz := clock_timestamp();
    lim double precision[];
    lvl double precision[];
    fit double precision;
    wait_ double precision := 0;
    n int;
begin
    if p_calls is null or p_calls < 1 or cardinality(p_cost) <> 4
       or exists (select from unnest(p_cost) c where c is null or c < 0 or c = 'NaN') then
        raise exception 'A quota reservation needs calls >= 1 and four costs >= 0, got % and %',
            p_calls, p_cost using errcode = 'invalid_parameter_value';
    end if;
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    lim := ai_job_quota_limits(q, p_caps);

    if lim[1] is null and lim[2] is null and lim[3] is null and lim[4] is null then
        if q.learned_at is not null then
            return query select p_calls, null::float8, false, false, false;
        end if;
        if q.learning_until is null or q.learning_until <= now_ then
            q.learning_calls := 0;  -- the lease ran out: its callers are gone
        end if;
        n := least(p_calls, greatest(0, coalesce(p_learners, 1) - q.learning_calls));
        if n = 0 then
            return query select 0, extract(epoch from q.learning_until - now_)::float8,
                                true, true, false;
            return;
        end if;
        update ai_job_provider_quotas t
        set learning_until = now_ + make_interval(secs => p_lease_seconds),
            learning_calls = q.learning_calls + n
        where t.provider = p_provider and t.model = p_model;
        return query select n, p_lease_seconds, true, true, false;
        return;
    end if;

    -- Learning calls still in flight took nothing from the buckets: until they are
    -- back, the levels do not count them, so no other call goes.
    if q.learning_calls > 0 and q.learning_until > now_ then
        return query select 0, least(p_lease_seconds,
                                     extract(epoch from q.learning_until - now_))::float8,
                            true, true, false;
        return;
    end if;
    if exists (select from generate_series(1, 4) k where p_cost[k] > lim[k]) then
        return query select 0, null::float8, true, false, true;
        return;
    end if;
    lvl := ai_job_quota_levels(q, lim, now_);
    select least(p_calls, coalesce(min(floor(lvl[k] / p_cost[k])), p_calls)) into fit
    from generate_series(1, 4) k where lim[k] is not null and p_cost[k] > 0;
    n := greatest(0, fit)::int;
    for k in 1..4 loop
        if lim[k] is not null then
            lvl[k] := lvl[k] - n * p_cost[k];
            if n < p_calls and p_cost[k] > 0 and p_cost[k] > lvl[k] then
                wait_ := greatest(wait_, (p_cost[k] - lvl[k]) * q.window_seconds / lim[k]);
            end if;
        end if;
    end loop;
    update ai_job_provider_quotas t
    set requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        refilled_at = now_
    where t.provider = p_provider and t.model = p_model;
    return query select n, case when n < p_calls then wait_ end, true, false, false;
end
$$;

-- Settle one call (or give back reservations not used: p_heard false). p_back:
-- what the reservation held beyond what the provider counted, by kind (negative:
-- the call cost more). From the answer's headers, when it had them: p_limits
-- (they replace the learned limits), p_remaining (a level is lowered to the
-- provider's remaining, refilled over the p_age_seconds since the call was
-- sent), p_window_seconds. p_heard: an answer came (without rate-limit headers,
-- the model is then not metered unless capped); p_learning: how many of the
-- calls settled were learning the limits; p_limited: the provider answered 429 despite the
-- reservation (each level it does not state is emptied). Returns whether the
-- model is metered now.
create or replace function ai_job_quota_settle(
    p_provider text, p_model text, p_back double precision[], p_caps bigint[],
    p_limits bigint[], p_remaining bigint[], p_age_seconds double precision,
    p_window_seconds double precision, p_heard boolean, p_learning int, p_limited boolean)
returns table(metered boolean)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
#variable_conflict use_column
declare
    q ai_job_provider_quotas;
    now_ timestamptz := clock_timestamp();
    lvl double precision[];
    lim double precision[];
    stated double precision;
begin
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    -- Brought to now under the limits that applied until now, then given back.
    lvl := ai_job_quota_levels(q, ai_job_quota_limits(q, p_caps), now_);
    for k in 1..4 loop
        lvl[k] := lvl[k] + coalesce(p_back[k], 0);
    end loop;

    if p_limits[1] > 0 then q.rpm := p_limits[1]; end if;
    if p_limits[2] > 0 then q.tpm := p_limits[2]; end if;
    if p_limits[3] > 0 then q.itpm := p_limits[3]; end if;
    if p_limits[4] > 0 then q.otpm := p_limits[4]; end if;
    if p_window_seconds > 0 and p_window_seconds <> 'Infinity' then
        q.window_seconds := least(60, greatest(1, p_window_seconds));
    end if;
    lim := ai_job_quota_limits(q, p_caps);
    for k in 1..4 loop
        if lim[k] is null then
            lvl[k] := null;
            continue;
        end if;
        lvl[k] := least(lim[k], coalesce(lvl[k], lim[k]));
        if p_remaining[k] >= 0 then
            -- Refilled since the call was sent: the provider wrote the headers as it
            -- admitted the call, a little later (a learning call's, not refilled: its
            -- fellow learners may have been admitted since).
            stated := coalesce(p_limits[k], lim[k]);
            lvl[k] := least(lvl[k], p_remaining[k]
                            + case when coalesce(p_learning, 0) > 0 then 0
                                   else greatest(0, coalesce(p_age_seconds, 0)) end
                              * stated / q.window_seconds);
        elsif p_limited then
            lvl[k] := least(lvl[k], 0);
        end if;
    end loop;

    update ai_job_provider_quotas t
    set rpm = q.rpm, tpm = q.tpm, itpm = q.itpm, otpm = q.otpm,
        requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        window_seconds = q.window_seconds,
        refilled_at = now_,
        learned_at = case when p_heard then now_ else t.learned_at end,
        learning_calls = greatest(0, t.learning_calls - coalesce(p_learning, 0)),
        learning_until = case when t.learning_calls - coalesce(p_learning, 0) <= 0 then null
                              else t.learning_until end,
        limited_at = case when p_limited then now_ else t.limited_at end
    where t.provider = p_provider and t.model = p_model;
    return query select lim[1] is not null or lim[2] is not null or lim[3] is not null
                        or lim[4] is not null;
end
$$;

-- Operators: forget what was learned (after a change of tier, say), for one
-- model, one provider or all; the next answers teach the limits again. E.g.
--   select ai_job_quota_reset('openai');
create or replace function ai_job_quota_reset(p_provider text default null, p_model text default null)
returns int
language sql
set search_path = pg_catalog, public, pg_temp
as $$
    with gone as (
        delete from ai_job_provider_quotas
        where (p_provider is null or provider = p_provider) and (p_model is null or model = p_model)
        returning 1
    )
    select count(*)::int from gone
$$;

-- Least privilege: the worker and operators (service_role) only (the two helpers
-- are called by the functions, which run as their caller).
alter table ai_job_provider_quotas enable row level security;
revoke all on ai_job_provider_quotas from public, anon, authenticated, service_role;
grant select, insert, update, delete on ai_job_provider_quotas to service_role;
revoke execute on function
    ai_job_quota_limits(ai_job_provider_quotas, bigint[]),
    ai_job_quota_levels(ai_job_provider_quotas, double precision[], timestamptz),
    ai_job_quota_reserve(text, text, int, double precision[], bigint[], double precision, int),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean),
    ai_job_quota_reset(text, text)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_quota_limits(ai_job_provider_quotas, bigint[]),
    ai_job_quota_levels(ai_job_provider_quotas, double precision[], timestamptz),
    ai_job_quota_reserve(text, text, int, double precision[], bigint[], double precision, int),
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean),
    ai_job_quota_reset(text, text)
    to service_role;
