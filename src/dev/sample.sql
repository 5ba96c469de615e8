-- The sample application of `rlsgate demo` and the test suite: todos that
-- each user sees and changes only for themselves.
create role authenticated login password 'authenticated-dev-password';
create role anonymous login password 'anonymous-dev-password';

create table todos (
    id bigint generated always as identity primary key,
    user_id text not null default auth.user_id(),
    title text not null,
    done boolean not null default false
);
alter table todos enable row level security;

-- `(select auth.user_id())` is evaluated once per query, not once per row.
create policy todos_select on todos for select to authenticated
    using ((select auth.user_id()) = user_id);
create policy todos_insert on todos for insert to authenticated
    with check ((select auth.user_id()) = user_id);
create policy todos_update on todos for update to authenticated
    using ((select auth.user_id()) = user_id)
    with check ((select auth.user_id()) = user_id);
create policy todos_delete on todos for delete to authenticated
    using ((select auth.user_id()) = user_id);

grant select, insert, update, delete on todos to authenticated;
