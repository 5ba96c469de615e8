"""asyncpg and its pool through rlsgate, used as their users use them.

asyncpg prepares every query but an execute() without arguments as a named
statement (`__asyncpg_stmt_N__`) and keeps it in a statement cache per
connection. The checks run it unchanged, that cache included: nothing here
sets statement_cache_size. Its pool's own reset (RESET ALL) also clears the
session's claims, so the pool here resets without it (keep_claims); a check
shows what the default does, with and without transaction pooling.

The connection details come from the environment (tests/integration/clients.rs sets
them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy ends
at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_POOL_MODE=transaction
(the proxy lends its RLSGATE_POOL_SIZE backends per transaction), the same
checks, and those of transaction mode: what it refuses, a connection's
settings and prepared statements following it from backend to backend, and
no more backends than RLSGATE_POOL_SIZE however many connections are open.
Exits 0 only if every check passed; prints each check.
"""

import asyncio
import datetime
import decimal
import io
import json
import os
import sys
import time
import traceback
import uuid

import asyncpg
from asyncpg import exceptions

from transaction_mode import (
    POOL_MODE,
    POOL_SIZE,
    REFUSED,
    TRANSACTION_MODE,
    AsyncRotation,
    names_transaction_pooling,
)

host = os.environ["RLSGATE_HOST"]
port = int(os.environ["RLSGATE_PORT"])
db = os.environ["RLSGATE_DB"]
ALICE = os.environ["ALICE_TOKEN"]
BOB = os.environ["BOB_TOKEN"]
EXPIRED = os.environ["EXPIRED_TOKEN"]
SHORT = os.environ["SHORT_TOKEN"]
SHORT_ENDS_AT = int(os.environ["SHORT_TOKEN_ENDS_AT"])

# The prefix of the names asyncpg gives its statements, and of those the
# proxy prepares them under on a backend it lends.
ASYNCPG_PREFIX = "__asyncpg_stmt_"
PROXY_PREFIX = "rlsgate_"

failures = []
steps = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail else ''}")
    if not ok:
        failures.append(name)


def step(fn):
    """A group of checks; an unexpected exception fails it."""
    steps.append(fn)
    return fn


def transaction_mode_step(fn):
    """A group of checks of transaction mode, run only in it."""
    if TRANSACTION_MODE:
        steps.append(fn)
    return fn


async def connect_with_url(token):
    # docs:begin asyncpg-url
    conn = await asyncpg.connect(
        f"postgresql://authenticated:{token}@{host}:{port}/{db}",
        timeout=10,
    )
    # docs:end
    return conn


async def connect_with_parameters(token):
    # docs:begin asyncpg-parameters
    conn = await asyncpg.connect(
        host=host,
        port=port,
        database=db,
        user="authenticated",
        password=token,  # the user's JWT
        timeout=10,
    )
    # docs:end
    return conn


# docs:begin asyncpg-pool
async def keep_claims(conn: asyncpg.Connection) -> None:
    # asyncpg's reset without its RESET ALL, which would also clear the
    # session's claims. The pool is one token's: its settings are its user's.
    await conn.execute("select pg_advisory_unlock_all(); close all; unlisten *;")


async def pool_for(jwt: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        host=host, port=port, database=db, user="authenticated",
        password=jwt, timeout=10, min_size=0, max_size=10, reset=keep_claims)
# docs:end


def expected_prefix():
    """The prefix of the names a backend holds asyncpg's statements under."""
    return PROXY_PREFIX if TRANSACTION_MODE else ASYNCPG_PREFIX


async def prepared_here(conn, *texts):
    """The names of the statements prepared on the backend running `conn`'s
    current transaction whose text is one of `texts`."""
    rows = await conn.fetch(
        "select name from pg_prepared_statements where statement = any($1::text[]) order by name",
        list(texts),
    )
    return [r["name"] for r in rows]


# Sessions of the short-lived token start first, so that they are idle when
# the token runs out; the last step looks at them.
short_lived = {"terminated": []}


@step
async def sessions_with_a_short_lived_token_start():
    conn = await connect_with_parameters(SHORT)
    conn.add_termination_listener(short_lived["terminated"].append)
    short_lived["conn"] = conn
    user = await conn.fetchval("select auth.user_id()")
    check("a short-lived token connects", user == "alice", user)
    short_lived["pool"] = await pool_for(SHORT)
    user = await short_lived["pool"].fetchval("select auth.user_id()")
    check("a pool for the short-lived token connects", user == "alice", user)


@step
async def connects_both_ways():
    conn = await connect_with_url(ALICE)
    try:
        user = await conn.fetchval("select auth.user_id()")
        check("connection string: auth.user_id() is alice", user == "alice", user)
    finally:
        await conn.close()
    conn = await connect_with_parameters(ALICE)
    try:
        user = await conn.fetchval("select auth.user_id()")
        check("keyword parameters: auth.user_id() is alice", user == "alice", user)
    finally:
        await conn.close()


@step
async def queries_and_transactions():
    conn = await connect_with_url(ALICE)
    try:
        row = await conn.fetchrow(
            "insert into todos (title) values ($1) returning user_id, title", "asyncpg: parameterized"
        )
        check("parameterized insert fills user_id from the token",
              tuple(row) == ("alice", "asyncpg: parameterized"), row)

        async with conn.transaction():
            await conn.execute("insert into todos (title) values ($1)", "asyncpg: committed")
        try:
            async with conn.transaction():
                await conn.execute("insert into todos (title) values ($1)", "asyncpg: rolled back")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        titles = [
            r["title"]
            for r in await conn.fetch(
                "select title from todos where title = any($1::text[]) order by title",
                ["asyncpg: committed", "asyncpg: rolled back"],
            )
        ]
        check("the committed transaction stays, the rolled back one does not",
              titles == ["asyncpg: committed"], titles)

        await conn.executemany(
            "insert into todos (title) values ($1)", [(f"asyncpg: many {i}",) for i in range(50)]
        )
        count = await conn.fetchval("select count(*) from todos where title like 'asyncpg: many %'")
        check("executemany inserted its 50 rows", count == 50, count)
    finally:
        await conn.close()


# A query asyncpg prepares once and keeps in its statement cache.
CACHED = "select title, user_id from todos where title = $1"


@step
async def the_statement_cache_serves_repeated_queries():
    conn = await connect_with_parameters(ALICE)
    try:
        titles = [f"asyncpg: cached {i}" for i in range(20)]
        await conn.executemany("insert into todos (title) values ($1)", [(t,) for t in titles])
        got = [await conn.fetchrow(CACHED, t) for t in titles]
        check("a cached statement ran 20 times with its parameters",
              [tuple(r) for r in got] == [(t, "alice") for t in titles], got)

        # An explicitly prepared statement, asyncpg's own name, run many times.
        stmt = await conn.prepare("select count(*) from todos where title like $1")
        check("conn.prepare() names its statement as asyncpg does",
              stmt.get_name().startswith(ASYNCPG_PREFIX), stmt.get_name())
        counts = [await stmt.fetchval(f"asyncpg: cached {i}%") for i in range(1, 4)]
        # "cached 1%" also matches 10 to 19.
        check("the prepared statement ran with each parameter", counts == [11, 1, 1], counts)

        async with conn.transaction():
            await conn.fetchrow(CACHED, titles[0])
            names = await prepared_here(conn, CACHED)
        check(f"the cached statement is one statement on its backend, named {expected_prefix()}…",
              len(names) == 1 and names[0].startswith(expected_prefix()), names)
    finally:
        await conn.close()


# Values of several types, sent as parameters and read back.
TYPED = (
    "select $1::int4 as i4, $2::int8 as i8, $3::numeric as num, $4::float8 as f8, "
    "$5::bool as b, $6::text as t, $7::bytea as bin, $8::uuid as id, "
    "$9::timestamptz as ts, $10::date as d, $11::interval as iv, $12::jsonb as js, "
    "$13::int4[] as ints, $14::text[] as texts, null::text as nothing"
)


@step
async def fetch_round_trips_several_types():
    values = (
        42,
        2**40,
        decimal.Decimal("12345.6789"),
        0.5,
        True,
        "naïve ☃",
        b"\x00\xffbytes",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc),
        datetime.date(2026, 2, 28),
        datetime.timedelta(days=3, seconds=7),
        json.dumps({"a": [1, 2, {"b": None}]}),
        [1, 2, 3],
        ["x", "y z"],
    )
    conn = await connect_with_parameters(ALICE)
    try:
        row = await conn.fetchrow(TYPED, *values)
        got = tuple(row)
        got = got[:11] + (json.dumps(json.loads(got[11])),) + got[12:]
        check("fetch returns each type's value as sent", got == values + (None,), got)
        # A table's row type has no codec of asyncpg's: it looks the type up
        # first, with queries of its own through the same connection.
        record = await conn.fetchval(
            "select t from todos t where title = $1", "asyncpg: parameterized"
        )
        check("a composite (todos' row type) is decoded after asyncpg introspects it",
              record is not None and record["user_id"] == "alice", record)
    finally:
        await conn.close()


@step
async def copy_in_and_out():
    conn = await connect_with_parameters(ALICE)
    try:
        records = [(i, f"asyncpg copy {i}") for i in range(100)]
        status = await conn.copy_records_to_table("scratch", records=records, columns=["id", "body"])
        check("copy_records_to_table copied 100 rows", status == "COPY 100", status)
        count = await conn.fetchval("select count(*) from scratch where body like 'asyncpg copy %'")
        check("the copied rows are in the table", count == 100, count)
        out = io.BytesIO()
        status = await conn.copy_from_query("select distinct user_id from todos", output=out)
        check("copy_from_query sees only alice's rows",
              out.getvalue() == b"alice\n" and status == "COPY 1", (status, out.getvalue()))
        user = await conn.fetchval("select auth.user_id()")
        check("the connection goes on after COPY", user == "alice", user)
    finally:
        await conn.close()


@step
async def sees_only_own_rows():
    conn = await connect_with_parameters(ALICE)
    try:
        owners = [r[0] for r in await conn.fetch("select distinct user_id from todos")]
        check("alice sees only her own rows", owners == ["alice"], owners)
        try:
            await conn.execute(
                "insert into todos (user_id, title) values ($1, $2)", "bob", "asyncpg: planted"
            )
            check("an insert for bob is refused", False, "it succeeded")
        except exceptions.InsufficientPrivilegeError as e:
            check("an insert for bob is refused with SQLSTATE 42501", e.sqlstate == "42501", e.sqlstate)
            check("the refusal names row-level security", "row-level security" in str(e), e)
        user = await conn.fetchval("select auth.user_id()")
        check("the session goes on after the refusal", user == "alice", user)
    finally:
        await conn.close()
    conn = await connect_with_url(BOB)
    try:
        owners = [r[0] for r in await conn.fetch("select distinct user_id from todos")]
        check("bob sees only his own rows", owners == ["bob"], owners)
    finally:
        await conn.close()


@step
async def expired_token_is_refused():
    try:
        conn = await connect_with_parameters(EXPIRED)
        await conn.close()
        check("an expired token is refused", False, "it connected")
    except exceptions.InvalidAuthorizationSpecificationError as e:
        check("the refusal has SQLSTATE 28000", e.sqlstate == "28000", e.sqlstate)
        check("the refusal says the token expired", "token expired" in str(e), e)
        check("the refusal is FATAL", e.severity == "FATAL", e.severity)


@step
async def pool_serves_concurrent_queries():
    pool = await pool_for(ALICE)
    try:
        # 20 queries on 10 connections: each connection is reset by
        # keep_claims and used again.
        rows = await asyncio.gather(*(
            pool.fetchrow("select auth.user_id(), pg_backend_pid(), $1::int from pg_sleep(0.05)", i)
            for i in range(20)
        ))
        async with pool.acquire() as conn:
            backends = await conn.fetchval(
                "select count(*) from pg_stat_activity "
                "where datname = current_database() and usename = current_user"
            )
        opened = pool.get_size()
    finally:
        await pool.close()
    check("20 concurrent pooled queries all ran", sorted(r[2] for r in rows) == list(range(20)))
    check("every pooled query ran as alice", all(r[0] == "alice" for r in rows), {r[0] for r in rows})
    pids = {r[1] for r in rows}
    check("the pool used several sessions", len(pids) > 1, len(pids))
    if TRANSACTION_MODE:
        check(f"the pool's {opened} connections ran on at most {POOL_SIZE} backends",
              opened > POOL_SIZE and len(pids) <= POOL_SIZE, (opened, len(pids)))
        check(f"pg_stat_activity shows at most {POOL_SIZE} backends", backends <= POOL_SIZE, backends)


@step
async def the_pools_default_reset_clears_the_claims_unless_pooling_per_transaction():
    # asyncpg's own reset runs RESET ALL when a connection goes back. Without
    # transaction pooling that empties the setting holding the claims, and
    # the session fails closed; a proxy pooling per transaction binds the
    # client's claims (and settings) to every transaction again.
    pool = await asyncpg.create_pool(
        host=host, port=port, database=db, user="authenticated",
        password=ALICE, timeout=10, min_size=1, max_size=1)
    try:
        first = await pool.fetchval("select auth.user_id()")
        check("a pool with asyncpg's default reset: the first query is alice's", first == "alice", first)
        try:
            again = await pool.fetchval("select auth.user_id()")
            check("after its RESET ALL, the claims are bound again in transaction mode",
                  TRANSACTION_MODE and again == "alice", again)
        except exceptions.InvalidAuthorizationSpecificationError as e:
            check("after its RESET ALL, the next query fails closed with 28000 (without transaction pooling)",
                  not TRANSACTION_MODE and e.sqlstate == "28000" and "cleared" in str(e), e)
    finally:
        await pool.close()


@transaction_mode_step
async def transaction_mode_refuses_what_it_cannot_keep():
    conn = await connect_with_parameters(ALICE)
    try:
        # execute() without arguments sends the simple protocol; fetch() a
        # statement of asyncpg's cache, twice.
        attempts = [(f"{sql}: execute", conn.execute, sql) for sql in REFUSED]
        attempts += [(f"{sql}: fetch {n}", conn.fetch, sql) for sql in REFUSED for n in (1, 2)]
        for what, run, sql in attempts:
            await refused(conn, what, run(sql))
        await refused(conn, "add_listener", conn.add_listener("rlsgate_checks", lambda *_: None))
        async with conn.transaction():
            await conn.execute("create temp table asyncpg_scratch (x int) on commit drop")
            await conn.executemany("insert into asyncpg_scratch values ($1)", [(1,), (2,)])
            await conn.execute("select pg_advisory_xact_lock(4242)")
            count = await conn.fetchval("select count(*) from asyncpg_scratch")
        check("a temporary table ON COMMIT DROP and an xact lock work in a transaction", count == 2, count)
        await conn.execute("notify rlsgate_checks, 'from asyncpg'")
    finally:
        await conn.close()


async def refused(conn, what, attempt):
    """`attempt` fails with 0A000 naming transaction pooling; then `conn` goes on."""
    try:
        await attempt
        check(f"{what}: refused", False, "it ran")
    except exceptions.FeatureNotSupportedError as e:
        check(f"{what}: refused with 0A000 naming transaction pooling",
              e.sqlstate == "0A000" and names_transaction_pooling(e), e)
    user = await conn.fetchval("select auth.user_id()")
    check(f"{what}: the connection goes on", user == "alice", user)


# What each transaction of the connection under test reports, from
# asyncpg's statement cache and from a statement it prepared explicitly.
ROUND = (
    "select pg_backend_pid(), auth.user_id(), current_setting('application_name'), "
    "current_setting('search_path'), $1::int"
)
ROUND_PREPARED = ROUND + " as prepared"


@transaction_mode_step
async def settings_and_prepared_statements_follow_the_connection():
    conn = await connect_with_parameters(ALICE)
    rotation = await AsyncRotation.start(lambda: connect_with_parameters(ALICE))
    try:
        await conn.execute("set application_name = 'asyncpg in transaction mode'")
        await conn.execute("set search_path = public, auth")
        stmt = await conn.prepare(ROUND_PREPARED)
        rows = []
        for i in range(8):
            rows.append(await conn.fetchrow(ROUND, i))
            await rotation.turn()
            rows.append(await stmt.fetchrow(i))
            await rotation.turn()
        # Both, run again in one transaction, are prepared on its backend.
        async with conn.transaction():
            await conn.fetchrow(ROUND, 8)
            await stmt.fetchrow(8)
            here = await prepared_here(conn, ROUND, ROUND_PREPARED)
    finally:
        await rotation.close()
        await conn.close()
    want = [("alice", "asyncpg in transaction mode", "public, auth", i // 2) for i in range(16)]
    got = [tuple(row)[1:] for row in rows]
    check("every transaction saw alice and the connection's settings", got == want,
          f"{len(got)} transactions" if got == want else got)
    pids = [row[0] for row in rows]
    moved = sum(a != b for a, b in zip(pids, pids[1:]))
    check("each transaction ran on a different backend from the last", moved == len(pids) - 1, pids)
    check("asyncpg's statements are prepared on the backend running them, under names of the proxy's",
          len(here) == 2 and all(name.startswith(PROXY_PREFIX) for name in here), here)


@step
async def sessions_end_with_their_token():
    await asyncio.sleep(max(0.0, SHORT_ENDS_AT + 1 - time.time()))
    conn = short_lived["conn"]
    check("the idle connection is closed", conn.is_closed())
    check("its termination listener was called", short_lived["terminated"] == [conn],
          short_lived["terminated"])
    try:
        await conn.fetchval("select 1")
        check("a query after the token expired fails", False, "the query ran")
    except exceptions.InterfaceError as e:
        check("a query after the token expired fails with InterfaceError", True, e)
    await conn.close()

    # The pool connects again for the next query; the expired token is refused.
    pool = short_lived["pool"]
    try:
        await pool.fetchval("select 1")
        check("the pool of the expired token gives no connection", False, "a query ran")
    except exceptions.InvalidAuthorizationSpecificationError as e:
        check("the pool of the expired token is refused with SQLSTATE 28000", e.sqlstate == "28000", e.sqlstate)
        check("it says the token expired", "token expired" in str(e), e)
    finally:
        pool.terminate()


async def main():
    for fn in steps:
        try:
            await fn()
        except Exception:
            check(fn.__name__, False, traceback.format_exc())


asyncio.run(main())
print(f"asyncpg {asyncpg.__version__}, pool mode {POOL_MODE}")
if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all asyncpg checks passed")
