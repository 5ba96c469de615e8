-- pgbench's custom script for check.sh: each transaction inserts a todo
-- (user_id comes from the token) and reads it back. With -M extended or
-- -M prepared, :n is sent as a bind parameter, not in the query text.
-- docs:begin pgbench-script
\set n random(1, 1000000000)
insert into todos (title) values ('pgbench ' || :n::text);
select count(*) from todos where title = 'pgbench ' || :n::text;
-- docs:end
