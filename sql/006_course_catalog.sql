-- 006: the course catalog, one row per finished course.
--
-- courses/catalog.json is rendered from these rows. Keeping the catalog in the
-- database rather than read-modify-writing the file means workers finishing at
-- the same moment, on any host, never lose each other's entries: each upserts its
-- own row, and a render (serialized by an advisory lock) writes them all.
--
-- cache_key (a hash of the normalized subject and params) lets a new job with the
-- same request reuse a recent course instead of asking a provider again.

create table if not exists ai_course_catalog (
    course_id   text primary key,
    job_id      uuid not null,
    subject     text not null,
    title       text not null,
    description text not null default '',
    level       text,
    language    text,
    group_count int not null default 0,
    item_count  int not null default 0,
    result_path text not null,
    cache_key   text,
    provider    text,
    model       text,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

create index if not exists ai_course_catalog_cache_idx
    on ai_course_catalog (cache_key, updated_at desc) where cache_key is not null;

grant all on ai_course_catalog to service_role;
