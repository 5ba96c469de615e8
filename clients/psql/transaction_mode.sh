# shellcheck shell=bash
# The checks check.sh adds when the proxy pools per transaction
# (RLSGATE_POOL_MODE=transaction, RLSGATE_POOL_SIZE backends): sourced by
# check.sh, with its `as`, `check`, `check_contains` and `failures`.
#
# - What transaction mode refuses (LISTEN, session advisory locks, WITH HOLD
#   cursors, temporary tables without ON COMMIT DROP) fails with SQLSTATE
#   0A000, and the session goes on; what it keeps works.
# - A prepared statement is gone after its transaction.
# - A session's SET follows it: psql sessions fed through FIFOs hold all of
#   the proxy's backends but one in open transactions and hand them round,
#   so that each transaction of the session under test runs on a different
#   backend from its last, and each sees the session's settings.

# What transaction mode refuses, then what it keeps, in one session.
as "$ALICE_TOKEN" -v ON_ERROR_STOP=0 -v VERBOSITY=verbose >"$out" 2>"$out.err" <<'SQL'
listen psql_checks;
select pg_advisory_lock(4242);
declare psql_held cursor with hold for select 1;
create temp table psql_scratch (x int);
begin;
create temp table psql_scratch (x int);
select 'not reached';
rollback;
select 'usable: ' || auth.user_id();
begin;
create temp table psql_scratch (x int) on commit drop;
insert into psql_scratch values (1), (2);
select count(*) from psql_scratch;
select 'xact lock' from pg_advisory_xact_lock(4242);
declare psql_cursor cursor for select 'cursor row';
fetch psql_cursor;
commit;
notify psql_checks, 'from psql';
begin;
prepare psql_once as select 'prepared ' || auth.user_id();
execute psql_once;
commit;
execute psql_once;
SQL
refused=$(grep -c '^ERROR:  0A000: .*transaction pool' "$out.err")
check "LISTEN, pg_advisory_lock, WITH HOLD and two CREATE TEMP TABLE are refused with 0A000 naming transaction pooling" 5 "$refused"
check_contains "a refused statement aborts its transaction block" "ERROR:  25P02" "$(cat "$out.err")"
check "the session goes on; ON COMMIT DROP, xact locks, cursors and a transaction's PREPARE work" \
  "usable: alice,2,xact lock,cursor row,prepared alice" "$(paste -sd, "$out")"
check_contains "a prepared statement is gone after its transaction" \
  'ERROR:  26000: prepared statement "psql_once" does not exist' "$(cat "$out.err")"
rm -f "$out.err"

# psql sessions kept open, each fed through a FIFO.
fifos=$(mktemp -d)
declare -A session_in session_out
session_open() { # NAME TOKEN
  mkfifo "$fifos/$1.in" "$fifos/$1.out"
  as "$2" -v ON_ERROR_STOP=0 <"$fifos/$1.in" >"$fifos/$1.out" 2>&1 &
  local fd
  exec {fd}>"$fifos/$1.in"
  session_in[$1]=$fd
  exec {fd}<"$fifos/$1.out"
  session_out[$1]=$fd
}
session_sql() { # NAME SQL: prints what SQL prints, up to a marker
  printf '%s\n\\echo __done__\n' "$2" >&"${session_in[$1]}"
  local line
  while IFS= read -r -t 20 line <&"${session_out[$1]}"; do
    [ "$line" = __done__ ] && return 0
    printf '%s\n' "$line"
  done
  echo "session $1: no answer within 20 s"
}
session_close() { # NAME
  local fd=${session_in[$1]}
  exec {fd}>&-
  fd=${session_out[$1]}
  exec {fd}<&-
}

# Holders: all backends but one in open transactions; `rotate` hands them
# round (the idle one takes the backend just used, the longest holding one
# lets go of its own).
session_open under_test "$ALICE_TOKEN"
holders=()
for ((i = 0; i < RLSGATE_POOL_SIZE; i++)); do
  session_open "holder$i" "$ALICE_TOKEN"
  holders+=("holder$i")
done
idle=${holders[0]}
busy=("${holders[@]:1}")
for holder in "${busy[@]}"; do
  session_sql "$holder" 'begin; select pg_backend_pid();' >/dev/null
done
rotate() {
  session_sql "$idle" 'begin; select pg_backend_pid();' >/dev/null
  busy+=("$idle")
  idle=${busy[0]}
  busy=("${busy[@]:1}")
  session_sql "$idle" 'commit;' >/dev/null
}

session_sql under_test "set application_name = 'psql in transaction mode';
set search_path = public, auth;" >"$out"
check "the session's SET is accepted" "" "$(cat "$out")"
last_pid=
moved=0
rounds=6
for ((round = 0; round < rounds; round++)); do
  got=$(session_sql under_test "begin;
prepare round as select pg_backend_pid(), auth.user_id(), current_setting('application_name'), current_setting('search_path'), \$1::int;
execute round($round);
commit;")
  pid=${got%%|*}
  check "round $round: the session's settings on backend $pid" \
    "alice|psql in transaction mode|public, auth|$round" "${got#*|}"
  [ -n "$last_pid" ] && [ "$pid" != "$last_pid" ] && moved=$((moved + 1))
  last_pid=$pid
  rotate
done
check "each transaction ran on a different backend from the last" $((rounds - 1)) "$moved"

for name in under_test "${holders[@]}"; do
  session_close "$name"
done
wait
rm -rf "$fifos"
