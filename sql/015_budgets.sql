-- 015: a daily spend cap per user, enforced by the database like the rate limit.
--
-- ai_job_settings.daily_budget_usd_per_user (null: no cap). An insert into either
-- job table by a user whose jobs created in the last 24 hours cost that much or
-- more is refused with SQLSTATE AJ402 and a message beginning "Budget exceeded".
-- What a job costs: a done job its metrics' estimatedCostUsd (what the providers'
-- reported usage costs at the list prices); a job not finished yet (pending,
-- processing, failed with retries left, stale) budget_estimate_usd_per_job, so
-- that a burst of inserts cannot outrun the cap before any of them is done; a
-- job that ended without a result (dead_letter, cancelled) nothing.
--
--   update ai_job_settings set daily_budget_usd_per_user = 5;   -- from psql, no restart
--
-- `ai-jobs migrate` writes DAILY_BUDGET_USD_PER_USER here when that setting is set.

alter table ai_job_settings
    add column if not exists daily_budget_usd_per_user numeric(12, 4)
        check (daily_budget_usd_per_user >= 0),
    add column if not exists budget_estimate_usd_per_job numeric(12, 4) not null default 0.05
        check (budget_estimate_usd_per_job >= 0);

-- Budget rejections: a sequence survives the rejected insert's rollback (see the
-- rate-limit counter in 001).
create sequence if not exists ai_job_budget_rejections;

-- What a user's jobs created since `since` cost, both tables, unfinished ones at
-- the estimate. Uses the (created_by, created_at) indexes of 001.
create or replace function ai_job_user_spend(user_id uuid, since timestamptz)
returns numeric
language sql stable
as $$
    select coalesce(sum(case
        when j.status = 'done' then
            case when jsonb_typeof(j.metrics -> 'estimatedCostUsd') = 'number'
                 then (j.metrics ->> 'estimatedCostUsd')::numeric
                 else s.budget_estimate_usd_per_job end
        when j.status in ('pending', 'processing', 'failed', 'stale')
            then s.budget_estimate_usd_per_job
        else 0 end), 0)
    from (
        select status, metrics from ai_course_jobs where created_by = user_id and created_at > since
        union all
        select status, metrics from ai_media_jobs where created_by = user_id and created_at > since
    ) j, ai_job_settings s
$$;

-- BEFORE INSERT, per row, for rows with a created_by; its own trigger beside the
-- rate limit's. Concurrent inserts by one user (into either table) queue on a
-- transaction-level advisory lock, so each one counts the rows the previous ones
-- committed (every statement of a volatile function takes a fresh snapshot in
-- READ COMMITTED). SECURITY DEFINER: the other table, the counter and the
-- settings are not the inserting user's to read or touch.
create or replace function ai_job_enforce_budget() returns trigger
language plpgsql security definer set search_path = public, pg_temp
as $$
declare
    cap numeric;
    spent numeric;
begin
    select daily_budget_usd_per_user into cap from ai_job_settings;
    if cap is null then
        return new;
    end if;
    perform pg_advisory_xact_lock(hashtext('ai_job_budget'), hashtext(new.created_by::text));
    spent := ai_job_user_spend(new.created_by, now() - interval '24 hours');
    if spent >= cap then
        perform nextval('ai_job_budget_rejections');
        raise exception 'Budget exceeded: $% spent or reserved in the last 24 hours (cap $% per user)',
            round(spent, 4), round(cap, 2)
            using errcode = 'AJ402',
                  hint = 'Wait, or change ai_job_settings.daily_budget_usd_per_user.';
    end if;
    return new;
end
$$;

create or replace trigger ai_course_jobs_budget
    before insert on ai_course_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_budget();

create or replace trigger ai_media_jobs_budget
    before insert on ai_media_jobs
    for each row when (new.created_by is not null)
    execute function ai_job_enforce_budget();

insert into ai_job_alert_state (rule) values ('budget_rejections') on conflict do nothing;

-- Least privilege. The trigger runs for every inserting role without an EXECUTE
-- grant (PostgreSQL checks it when the trigger is created, not when it fires).
revoke all on sequence ai_job_budget_rejections from public, anon, authenticated;
grant usage, select on sequence ai_job_budget_rejections to service_role;
revoke execute on function ai_job_user_spend(uuid, timestamptz), ai_job_enforce_budget()
    from public, anon, authenticated;
grant execute on function ai_job_user_spend(uuid, timestamptz) to service_role;
