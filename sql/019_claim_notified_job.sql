-- 019: the last millisecond between a notification and its handler.
--
-- claim_due_job: the worker claims the job a notification names, by its id, the
-- moment the notification arrives (listener/worker.py, the fast path). A payload is
-- a hint from a channel every role may write to, so the function claims nothing
-- that claim_jobs would not claim: a pending job, or a failed one with retries
-- left, whose run_after has come, in a table that is not paused, and not locked
-- by another claim (skip locked). A forged id (done, processing, cancelled, in
-- backoff, of the other table, or no job at all) claims nothing. Unlike
-- claim_job (the operator's "look at that job now", which ignores run_after),
-- it never starts a retry before its backoff ends. Static statements, one per
-- table: PL/pgSQL keeps their plans.
--
-- The claimed row: the columns a handler reads (its `job`), not the whole row
-- as `to_jsonb(j)`. The error, metrics, timestamps and claim fields of the row
-- were encoded by the server and decoded by the worker for every claimed job,
-- and read by nobody (the worker has the claim fields as columns of their own).
-- claim_jobs, complete_and_claim (through claim_jobs) and claim_job return the
-- same shape: {"id", "subject", "course_id", "params"} for a course job,
-- {"id", "prompt", "media_type", "course_id", "params"} for a media job.

create or replace function ai_job_claimed_course(j ai_course_jobs) returns jsonb
language sql immutable parallel safe
as $$
    select jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                              'params', j.params)
$$;

create or replace function ai_job_claimed_media(j ai_media_jobs) returns jsonb
language sql immutable parallel safe
as $$
    select jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                              'course_id', j.course_id, 'params', j.params)
$$;

create or replace function claim_due_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
as $$
#variable_conflict use_column
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = (
            select id from ai_course_jobs
            where id = job_id and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_course_jobs' and q.paused)
            for update of ai_course_jobs skip locked)
        returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  ai_job_claimed_course(j);
    else
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = (
            select id from ai_media_jobs
            where id = job_id and status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_media_jobs' and q.paused)
            for update of ai_media_jobs skip locked)
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  ai_job_claimed_media(j);
    end if;
end
$$;

-- As in 016, returning the handler's columns.
create or replace function claim_jobs(table_name text, worker text, max_jobs int default 1)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
as $$
#variable_conflict use_column
declare
    got int := 0;
begin
    if table_name is not null then
        perform ai_job_table(table_name);
    end if;
    if table_name is null or table_name = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = any(array(
            select id from ai_course_jobs
            where status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_course_jobs' and q.paused)
            order by run_after
            limit max_jobs
            for update of ai_course_jobs skip locked))
        returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  ai_job_claimed_course(j);
        get diagnostics got = row_count;
    end if;
    if (table_name is null and got < max_jobs) or table_name = 'ai_media_jobs' then
        return query
        update ai_media_jobs j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = worker, completed_at = null
        where j.id = any(array(
            select id from ai_media_jobs
            where status in ('pending', 'failed') and run_after <= now()
              and (status = 'pending' or retry_count < max_retries)
              and not exists (select from ai_job_queues q
                              where q.job_table = 'ai_media_jobs' and q.paused)
            order by run_after
            limit max_jobs - got
            for update of ai_media_jobs skip locked))
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  ai_job_claimed_media(j);
    end if;
end
$$;

-- As in 016 (the operator's "look at that job now"), returning the handler's columns.
create or replace function claim_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
as $$
begin
    return query execute format($q$
        update %1$I j
        set status = 'processing', started_at = clock_timestamp(),
            last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
            worker_id = $1, completed_at = null
        from (select id from %1$I
              where id = $2 and status in ('pending', 'failed')
                and (status = 'pending' or retry_count < max_retries)
                and not exists (select from ai_job_queues q where q.job_table = %1$L and q.paused)
              for update of %1$I skip locked) due
        where j.id = due.id
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, %2$I(j)
    $q$, ai_job_table(table_name),
       case ai_job_table(table_name) when 'ai_course_jobs' then 'ai_job_claimed_course'
                                     else 'ai_job_claimed_media' end) using worker, job_id;
end
$$;

------------------------------------------------------------------------------
-- Privileges: the worker only (service_role).
------------------------------------------------------------------------------

revoke execute on function
    ai_job_claimed_course(ai_course_jobs), ai_job_claimed_media(ai_media_jobs),
    claim_due_job(text, uuid, text), claim_jobs(text, text, int), claim_job(text, uuid, text)
from public, anon, authenticated, service_role;
grant execute on function
    ai_job_claimed_course(ai_course_jobs), ai_job_claimed_media(ai_media_jobs),
    claim_due_job(text, uuid, text), claim_jobs(text, text, int), claim_job(text, uuid, text)
to service_role;
