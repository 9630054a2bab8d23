-- 007: tell dashboards that jobs changed, on channel ai_jobs_events.
--
-- The worker claims and finishes jobs in batches, thousands per second, so this
-- costs one notification per statement, never one per row: statement-level
-- triggers whose payload is only the table name, and PostgreSQL folds identical
-- payloads of one transaction into one notification. A listener re-reads what it
-- shows; it never trusts a payload to carry the change.
--
-- Updates notify only when some row changed status: heartbeats (every 30 s for
-- every running job) and claims that found nothing stay silent. Transition
-- tables let a statement-level trigger see that; they cannot be combined with a
-- column list (UPDATE OF status), hence the join on id.
--
-- This channel is separate from ai_jobs so that dashboards never wake workers.

create or replace function ai_jobs_notify_events() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'INSERT' then
        if exists (select 1 from new_rows) then
            perform pg_notify('ai_jobs_events', tg_table_name);
        end if;
    elsif tg_op = 'DELETE' then
        if exists (select 1 from old_rows) then
            perform pg_notify('ai_jobs_events', tg_table_name);
        end if;
    elsif exists (select 1 from new_rows n join old_rows o on o.id = n.id
                  where n.status is distinct from o.status) then
        perform pg_notify('ai_jobs_events', tg_table_name);
    end if;
    return null;
end
$$;

create or replace trigger ai_course_jobs_events_insert
    after insert on ai_course_jobs
    referencing new table as new_rows
    for each statement execute function ai_jobs_notify_events();

create or replace trigger ai_course_jobs_events_update
    after update on ai_course_jobs
    referencing old table as old_rows new table as new_rows
    for each statement execute function ai_jobs_notify_events();

create or replace trigger ai_course_jobs_events_delete
    after delete on ai_course_jobs
    referencing old table as old_rows
    for each statement execute function ai_jobs_notify_events();

create or replace trigger ai_media_jobs_events_insert
    after insert on ai_media_jobs
    referencing new table as new_rows
    for each statement execute function ai_jobs_notify_events();

create or replace trigger ai_media_jobs_events_update
    after update on ai_media_jobs
    referencing old table as old_rows new table as new_rows
    for each statement execute function ai_jobs_notify_events();

create or replace trigger ai_media_jobs_events_delete
    after delete on ai_media_jobs
    referencing old table as old_rows
    for each statement execute function ai_jobs_notify_events();
