-- 004: row-level security in the Supabase style. A signed-in user (role
-- authenticated, identified by auth.uid()) sees and inserts only their own jobs;
-- every state change is the worker's. The worker connects as the tables' owner or
-- as service_role, and both bypass these policies (RLS is enabled, not forced).

alter table ai_course_jobs enable row level security;
alter table ai_media_jobs enable row level security;

drop policy if exists ai_course_jobs_select_own on ai_course_jobs;
create policy ai_course_jobs_select_own on ai_course_jobs
    for select to authenticated using (created_by = auth.uid());
drop policy if exists ai_course_jobs_insert_own on ai_course_jobs;
create policy ai_course_jobs_insert_own on ai_course_jobs
    for insert to authenticated with check (created_by = auth.uid());

drop policy if exists ai_media_jobs_select_own on ai_media_jobs;
create policy ai_media_jobs_select_own on ai_media_jobs
    for select to authenticated using (created_by = auth.uid());
drop policy if exists ai_media_jobs_insert_own on ai_media_jobs;
create policy ai_media_jobs_insert_own on ai_media_jobs
    for insert to authenticated with check (created_by = auth.uid());

grant select, insert on ai_course_jobs, ai_media_jobs to authenticated;
grant select on ai_job_settings to authenticated;
grant all on ai_course_jobs, ai_media_jobs, ai_job_settings, ai_job_counter_samples to service_role;
grant usage on sequence ai_job_rate_limit_rejections to service_role;
grant execute on function check_ai_job_rate_limit(uuid, text) to authenticated;
