-- 005: wake the listener on channel ai_jobs.
--
-- Inserts notify once per statement, not per row: a bulk insert of 10,000 jobs
-- sends one notification, and the worker, which claims "the next due jobs" and
-- never trusts a payload, drains them from the claim index. A one-row insert (the
-- usual case) names its job: {"table": "...", "id": "..."}; a larger one names
-- only its table: {"table": "...", "count": n}.
--
-- A status change back to pending (requeue, stale rescue, graceful release)
-- notifies per row, filtered by the trigger's WHEN so that the worker's own
-- updates (claim, heartbeat, finish) never call the function. Its payload names
-- only the table: PostgreSQL folds identical payloads of one transaction into
-- one notification, so a bulk requeue also wakes the listener once.
--
-- Notifications are sent at commit, so a listener never sees a job before it can
-- claim it.

create or replace function ai_jobs_notify_insert() returns trigger
language plpgsql
as $$
declare
    n bigint;
    one uuid;
begin
    select count(*), min(id::text)::uuid into n, one from new_jobs;
    if n = 1 then
        perform pg_notify('ai_jobs', json_build_object('table', tg_table_name, 'id', one)::text);
    elsif n > 1 then
        perform pg_notify('ai_jobs', json_build_object('table', tg_table_name, 'count', n)::text);
    end if;
    return null;
end
$$;

create or replace function ai_jobs_notify_pending() returns trigger
language plpgsql
as $$
begin
    perform pg_notify('ai_jobs', json_build_object('table', tg_table_name)::text);
    return null;
end
$$;

create or replace trigger ai_course_jobs_notify_insert
    after insert on ai_course_jobs
    referencing new table as new_jobs
    for each statement execute function ai_jobs_notify_insert();

create or replace trigger ai_media_jobs_notify_insert
    after insert on ai_media_jobs
    referencing new table as new_jobs
    for each statement execute function ai_jobs_notify_insert();

create or replace trigger ai_course_jobs_notify_pending
    after update of status on ai_course_jobs
    for each row when (new.status = 'pending' and old.status is distinct from 'pending')
    execute function ai_jobs_notify_pending();

create or replace trigger ai_media_jobs_notify_pending
    after update of status on ai_media_jobs
    for each row when (new.status = 'pending' and old.status is distinct from 'pending')
    execute function ai_jobs_notify_pending();
