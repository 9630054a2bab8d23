-- 037: the learned window is kept from the most exact answer, across workers.
--
-- The window (sql/023) is learned from an answer's reset times: limit x reset /
-- used. Each answer used to overwrite it. Where one kind alone says it (a small
-- requests quota whose tokens refill too fast for their reset to say anything),
-- answers differ in how exactly they say it: a remaining count is a whole
-- number, so an answer from a nearly full bucket, 1 of 4 requests used, may read
-- a 2 s window as 1 s, and the buckets then refill twice as fast as the
-- provider's (429s). The workers now say how far off each read may be
-- (`p_window_error`, relative), and the row keeps the most exact read: a less
-- exact one is stored only once the stored one is ten minutes old.
--
-- ai_job_quota_settle takes one more argument, last and optional (callers of
-- before 037 still reach it, and their windows are stored as before).

alter table ai_job_provider_quotas
    add column window_error double precision
        constraint ai_job_provider_quotas_window_error check (window_error >= 0),
    add column window_at timestamptz;

drop function ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean,
                        double precision);
create function ai_job_quota_settle(
    p_provider text, p_model text, p_back double precision[], p_caps bigint[],
    p_limits bigint[], p_remaining bigint[], p_age_seconds double precision,
    p_window_seconds double precision, p_heard boolean, p_learning int, p_limited boolean,
    p_reserved_seconds double precision default null,
    p_window_error double precision default null)
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
    share_ double precision;
    wiped boolean;
begin
    insert into ai_job_provider_quotas as t (provider, model) values (p_provider, p_model)
    on conflict do nothing;
    select * into q from ai_job_provider_quotas t
    where t.provider = p_provider and t.model = p_model for update;
    -- The time is read once the row is ours: never before the time the last
    -- writer refilled to (it may have read the clock later and locked first).
    now_ := greatest(clock_timestamp(), q.refilled_at);
    -- Brought to now under the limits that applied until now, then given back
    -- (not what a 429 since the reservation wiped).
    wiped := q.limited_at is not null and p_reserved_seconds is not null
             and now_ - make_interval(secs => greatest(0, p_reserved_seconds)) <= q.limited_at;
    lvl := ai_job_quota_levels(q, ai_job_quota_limits(q, p_caps), now_);
    for k in 1..4 loop
        lvl[k] := lvl[k] + case when wiped and p_back[k] > 0 then 0
                                else coalesce(p_back[k], 0) end;
    end loop;
    -- A 429 despite a reservation made since the last, whose headers say the
    -- quota held less than the call (a 429 for anything else, an overloaded
    -- provider, says nothing of the share): the buckets refilled faster than the
    -- provider let this deployment have (another client of the key), and the
    -- share is cut; once for the calls refused together.
    share_ := ai_job_quota_share(q, now_);
    if p_limited and coalesce(p_learning, 0) = 0 and not wiped
       and exists (select from generate_series(1, 4) k
                   where p_remaining[k] is not null and p_back[k] > 0
                     and p_remaining[k] < p_back[k])
       and (q.limited_at is null
            or q.limited_at < now_ - make_interval(secs => q.window_seconds / 30)) then
        share_ := greatest(0.05, share_ * 0.9);
    end if;

    if p_limits[1] > 0 then q.rpm := p_limits[1]; end if;
    if p_limits[2] > 0 then q.tpm := p_limits[2]; end if;
    if p_limits[3] > 0 then q.itpm := p_limits[3]; end if;
    if p_limits[4] > 0 then q.otpm := p_limits[4]; end if;
    -- A window read less exactly than the stored one (both said: 1/used plus the
    -- reset's last digit over the reset) is not stored until that one is ten
    -- minutes old: a near-full bucket's answer may read it half its length.
    if p_window_seconds > 0 and p_window_seconds <> 'Infinity'
       and (p_window_error is null or q.window_error is null
            or p_window_error <= q.window_error
            or q.window_at < now_ - interval '10 minutes') then
        q.window_seconds := least(60, greatest(1, p_window_seconds));
        q.window_error := p_window_error;
        q.window_at := now_;
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
                              * stated * share_ / q.window_seconds);
        elsif p_limited then
            lvl[k] := least(lvl[k], 0);
        end if;
    end loop;

    update ai_job_provider_quotas t
    set rpm = q.rpm, tpm = q.tpm, itpm = q.itpm, otpm = q.otpm,
        requests = lvl[1], tokens = lvl[2], input_tokens = lvl[3], output_tokens = lvl[4],
        window_seconds = q.window_seconds,
        window_error = q.window_error,
        window_at = q.window_at,
        share = share_,
        share_at = now_,
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

revoke execute on function
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean,
                        double precision, double precision)
    from public, anon, authenticated, service_role;
grant execute on function
    ai_job_quota_settle(text, text, double precision[], bigint[], bigint[], bigint[],
                        double precision, double precision, boolean, int, boolean,
                        double precision, double precision)
    to service_role;
