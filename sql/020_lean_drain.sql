-- 020: less server CPU per job in the worker's drain, with the same results.
--
-- Measured on the bench's server (PostgreSQL 18) with one connection draining
-- 30,000 jobs through the statements of listener/queries/core.sql (claim_jobs,
-- then complete_and_claim in a loop): the backend's CPU per job went from about
-- 47 µs to about 35 in batches of 40, and from about 88 to 64 in batches of 10.
-- Each change below was kept for a saving of its own, measured by undoing it alone.
--
-- 1. The claimed job is built from the updated row's columns in RETURNING
--    (jsonb_build_object('id', j.id, ...)), not by ai_job_claimed_course(j) /
--    ai_job_claimed_media(j) (019): a function of the whole row made the executor
--    form and flatten a copy of every claimed row only to read four or five of
--    its columns. Same keys, same values. Nothing else called those two
--    functions: they go. About 1 to 2 µs a job.
--
-- 2. complete_and_claim runs its two UPDATEs itself, static statements per table
--    (PL/pgSQL keeps their plans), instead of RETURN QUERY over complete_jobs()
--    and claim_jobs(): two function calls a call, and each nested set-returning
--    call put its rows in a tuplestore that the outer RETURN QUERY copied into
--    its own. Same guards, same rows in the same order (the completed ids as
--    'done', then the claimed jobs as 'claimed'); an unknown or null table name
--    raises, as before. About 1 to 2 µs a job in batches of 10 (a cost per call),
--    within the noise in batches of 40.
--
-- 3. The claim statements are planned once per session, not at every call:
--    plan_cache_mode = force_generic_plan on claim_jobs and complete_and_claim.
--    With `limit max_jobs` unknown, the planner costs the generic plan as if it
--    locked a tenth of the due jobs, so the plan cache judged it worse than a
--    plan made for the given number and planned the claim again at every call
--    (about 0.14 ms). The generic plan is the same plan. About 3.5 to 4.5 µs a
--    job in batches of 40.
--
-- 4. A completion finds each job's place in the arrays by its claim token
--    (array_position(tokens, j.claim_token)) instead of joining the jobs to
--    unnest(job_ids, tokens, ...): the planner, which expects a row or so in
--    `processing`, nested the loop over the unnested arrays inside the loop over
--    the jobs, the batch size squared comparisons per statement (1,600 for 40
--    jobs). A job is written when the id at its token's place is its own, and a
--    null token matches nothing: the join's rows for what a worker sends (each
--    job's id beside its own token; a claim token is one claim's, a fresh
--    gen_random_uuid() per claimed row). Only a caller that sends a job's token
--    beside another job's id first, and beside its own further on, sees a
--    difference: the job is not written. complete_jobs (the completer's batches)
--    changes the same way. About 4 µs a job in batches of 40, more in larger ones.

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
                  jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params);
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
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params);
    end if;
end
$$;

create or replace function claim_jobs(table_name text, worker text, max_jobs int default 1)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
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
                  jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params);
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
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params);
    end if;
end
$$;

-- The operator's "look at that job now" (as in 019, whatever its run_after).
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
        returning %1$L::text, j.id, j.claim_token, j.retry_count, j.max_retries, %2$s
    $q$, ai_job_table(table_name),
       case ai_job_table(table_name)
           when 'ai_course_jobs' then
               $e$jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params)$e$
           else
               $e$jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params)$e$
       end) using worker, job_id;
end
$$;

-- Finish a batch of jobs held with these tokens (processing, or stale but not
-- yet handed on); as in 009, each job found at its token's place in the arrays.
create or replace function complete_jobs(
    table_name text, job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns setof uuid
language plpgsql
as $$
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning j.id;
    else
        return query
        update ai_media_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning j.id;
    end if;
end
$$;

-- The worker's busy loop: the jobs that finished since its last claim written
-- done, and the next ones claimed, in one transaction (as in 003); the same two
-- statements as complete_jobs and claim_jobs.
create or replace function complete_and_claim(
    table_name text, worker text, max_jobs int,
    job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns table(kind text, job_table text, id uuid, claim_token uuid, retry_count int,
              max_retries int, job jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
begin
    if ai_job_table(table_name) = 'ai_course_jobs' then
        return query
        update ai_course_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning 'done'::text, 'ai_course_jobs'::text, j.id, null::uuid, null::int, null::int,
                  null::jsonb;
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
        returning 'claimed'::text, 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count,
                  j.max_retries,
                  jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params);
    else
        return query
        update ai_media_jobs j
        set status = 'done', completed_at = clock_timestamp(),
            result_path = result_paths[array_position(tokens, j.claim_token)],
            metrics = job_metrics[array_position(tokens, j.claim_token)],
            error = null, claim_token = null
        where j.id = any(job_ids) and j.status in ('processing', 'stale')
          and j.claim_token is not null
          and job_ids[array_position(tokens, j.claim_token)] = j.id
        returning 'done'::text, 'ai_media_jobs'::text, j.id, null::uuid, null::int, null::int,
                  null::jsonb;
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
            limit max_jobs
            for update of ai_media_jobs skip locked))
        returning 'claimed'::text, 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count,
                  j.max_retries,
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params);
    end if;
end
$$;

drop function if exists ai_job_claimed_course(ai_course_jobs);
drop function if exists ai_job_claimed_media(ai_media_jobs);
