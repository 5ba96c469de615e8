-- pgbench's script for check.sh in transaction mode: each client sets
-- application_name in its first transaction (`first` is 1 until then, from
-- -D first=1), and every transaction checks that it is still in force on
-- whichever backend runs it: otherwise it divides by zero, which aborts the
-- client and fails the run.
\if :first
set application_name = 'pgbench in transaction mode';
\set first 0
\endif
select 1 / (current_setting('application_name') = 'pgbench in transaction mode')::int;
