-- The sample todo application of docker-compose.yml: the statements of
-- src/dev/sample.sql (the schema of `rlsgate demo`), written so that running
-- them again, as every `docker compose up` does, changes nothing.
--
-- It needs schema `auth` (installed by `rlsgate init-db`): the column default
-- and the policies call auth.user_id(). That is why it is not a
-- /docker-entrypoint-initdb.d script, which would run when the database is
-- created, before init-db could; the sample-schema service runs it after
-- init-db has completed.

do $$
begin
    if not exists (select from pg_roles where rolname = 'authenticated') then
        create role authenticated login password 'authenticated-dev-password';
    end if;
    if not exists (select from pg_roles where rolname = 'anonymous') then
        create role anonymous login password 'anonymous-dev-password';
    end if;
end
$$;

create table if not exists todos (
    id bigint generated always as identity primary key,
    user_id text not null default auth.user_id(),
    title text not null,
    done boolean not null default false
);
alter table todos enable row level security;

-- `(select auth.user_id())` is evaluated once per query, not once per row.
drop policy if exists todos_select on todos;
create policy todos_select on todos for select to authenticated
    using ((select auth.user_id()) = user_id);
drop policy if exists todos_insert on todos;
create policy todos_insert on todos for insert to authenticated
    with check ((select auth.user_id()) = user_id);
drop policy if exists todos_update on todos;
create policy todos_update on todos for update to authenticated
    using ((select auth.user_id()) = user_id)
    with check ((select auth.user_id()) = user_id);
drop policy if exists todos_delete on todos;
create policy todos_delete on todos for delete to authenticated
    using ((select auth.user_id()) = user_id);

grant select, insert, update, delete on todos to authenticated;
