-- 034: the claimed media job carries its `batch` flag too (sql/031 did it for
-- course jobs): image jobs with `batch = true` go to OpenAI's Batch API
-- (listener/batches/, docs/generation.md "Batch jobs"), and the media table's
-- batch door reads the flag from the claim instead of asking the database for
-- every media job it starts. The four claim functions of sql/031, as they were,
-- with the one key added to the media rows' jsonb. Same signatures, same grants
-- (create or replace keeps them).

create or replace function claim_due_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
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
              and (not exists (select from ai_job_settings
                               where max_running_per_user is not null)
                   or ai_job_under_cap(created_by))
            for update of ai_course_jobs skip locked)
        returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                     'params', j.params, 'batch', j.batch);
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
              and (not exists (select from ai_job_settings
                               where max_running_per_user is not null)
                   or ai_job_under_cap(created_by))
            for update of ai_media_jobs skip locked)
        returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                  jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params,
                                     'batch', j.batch);
    end if;
end
$$;

create or replace function claim_job(table_name text, job_id uuid, worker text)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
    owner uuid;
begin
    execute format('select created_by from %I where id = $1', ai_job_table(table_name))
    into owner using job_id;
    if not ai_job_under_cap(owner) then
        return;
    end if;
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
                                     'params', j.params, 'batch', j.batch)$e$
           else
               $e$jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                     'course_id', j.course_id, 'params', j.params,
                                     'batch', j.batch)$e$
       end) using worker, job_id;
end
$$;

create or replace function claim_jobs(table_name text, worker text, max_jobs int default 1)
returns table(job_table text, id uuid, claim_token uuid, retry_count int, max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    got int := 0;
    ids uuid[];
    held uuid[];
begin
    if table_name is not null then
        perform ai_job_table(table_name);
    elsif exists (select from ai_job_settings where max_running_per_user is not null) then
        held := ai_job_due_users('ai_course_jobs') || ai_job_due_users('ai_media_jobs');
        perform ai_job_lock_users(held);
    end if;
    if table_name is null or table_name = 'ai_course_jobs' then
        ids := null;
        if held is not null or exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_course_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_course_jobs', max_jobs, held);
        end if;
        if ids is null then
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
                                         'params', j.params, 'batch', j.batch);
        else
            return query
            update ai_course_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_course_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_course_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_course_jobs skip locked))
            returning 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params, 'batch', j.batch);
        end if;
        get diagnostics got = row_count;
    end if;
    if (table_name is null and got < max_jobs) or table_name = 'ai_media_jobs' then
        ids := null;
        if held is not null or exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_media_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_media_jobs', max_jobs - got, held);
        end if;
        if ids is null then
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
                                         'course_id', j.course_id, 'params', j.params,
                                         'batch', j.batch);
        else
            return query
            update ai_media_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_media_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_media_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs - got
                for update of ai_media_jobs skip locked))
            returning 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count, j.max_retries,
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params,
                                         'batch', j.batch);
        end if;
    end if;
end
$$;

create or replace function complete_and_claim(
    table_name text, worker text, max_jobs int,
    job_ids uuid[], tokens uuid[], result_paths text[], job_metrics jsonb[])
returns table(kind text, job_table text, id uuid, claim_token uuid, retry_count int,
              max_retries int, job jsonb)
language plpgsql
set search_path = pg_catalog, public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    ids uuid[];
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
        ids := null;
        if exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_course_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_course_jobs', max_jobs);
        end if;
        if ids is null then
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
                                         'params', j.params, 'batch', j.batch);
        else
            return query
            update ai_course_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_course_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_course_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_course_jobs skip locked))
            returning 'claimed'::text, 'ai_course_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'subject', j.subject, 'course_id', j.course_id,
                                         'params', j.params, 'batch', j.batch);
        end if;
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
        ids := null;
        if exists (select from ai_job_settings where max_running_per_user is not null)
           or (select created_by from ai_media_jobs
               where status in ('pending', 'failed') and created_by is not null
               order by created_by, run_after desc limit 1) is not null then
            ids := ai_job_fair_ids('ai_media_jobs', max_jobs);
        end if;
        if ids is null then
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
                                         'course_id', j.course_id, 'params', j.params,
                                         'batch', j.batch);
        else
            return query
            update ai_media_jobs j
            set status = 'processing', started_at = clock_timestamp(),
                last_heartbeat = clock_timestamp(), claim_token = gen_random_uuid(),
                worker_id = worker, completed_at = null
            where j.id = any(array(
                select id from ai_media_jobs
                where id = any(ids) and status in ('pending', 'failed') and run_after <= now()
                  and (status = 'pending' or retry_count < max_retries)
                  and not exists (select from ai_job_queues q
                                  where q.job_table = 'ai_media_jobs' and q.paused)
                order by array_position(ids, id)
                limit max_jobs
                for update of ai_media_jobs skip locked))
            returning 'claimed'::text, 'ai_media_jobs'::text, j.id, j.claim_token, j.retry_count,
                      j.max_retries,
                      jsonb_build_object('id', j.id, 'prompt', j.prompt, 'media_type', j.media_type,
                                         'course_id', j.course_id, 'params', j.params,
                                         'batch', j.batch);
        end if;
    end if;
end
$$;
