"""psycopg 3 and psycopg_pool through rlsgate, used as their users use them.

The connection details come from the environment (tests/integration/clients.rs sets
them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy ends
at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_SSLMODE=require (the
proxy has a certificate), every connection is encrypted: libpq's
PGSSLMODE=require, which does not check the certificate, and each
connection's pgconn.ssl_in_use is checked. With RLSGATE_POOL_MODE=transaction
(the proxy lends its RLSGATE_POOL_SIZE backends per transaction), the same
checks, and those of transaction mode: what it refuses, and a connection's
settings and prepared statements following it from backend to backend.
Exits 0 only if every check passed; prints each check.
"""

import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from transaction_mode import REFUSED, TRANSACTION_MODE, Rotation, names_transaction_pooling

host = os.environ["RLSGATE_HOST"]
port = os.environ["RLSGATE_PORT"]
db = os.environ["RLSGATE_DB"]
ALICE = os.environ["ALICE_TOKEN"]
BOB = os.environ["BOB_TOKEN"]
EXPIRED = os.environ["EXPIRED_TOKEN"]
SHORT = os.environ["SHORT_TOKEN"]
SHORT_ENDS_AT = int(os.environ["SHORT_TOKEN_ENDS_AT"])
SSLMODE = os.environ.get("RLSGATE_SSLMODE")
if SSLMODE:
    os.environ["PGSSLMODE"] = SSLMODE  # libpq reads it at each connect

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail else ''}")
    if not ok:
        failures.append(name)


def check_encrypted(form, conn):
    """With RLSGATE_SSLMODE=require, the connection must be encrypted."""
    if SSLMODE == "require":
        check(f"{form}: the connection is encrypted", conn.pgconn.ssl_in_use)


def step(fn):
    """Runs one group of checks; an unexpected exception fails it."""
    try:
        fn()
    except Exception:
        check(fn.__name__, False, traceback.format_exc())
    return fn


def transaction_mode_step(fn):
    """A group of checks of transaction mode, run only in it."""
    return step(fn) if TRANSACTION_MODE else fn


def connect_with_url(token):
    # docs:begin psycopg-url
    conn = psycopg.connect(
        f"postgresql://authenticated:{token}@{host}:{port}/{db}",
        connect_timeout=10,
    )
    # docs:end
    check_encrypted("connection string", conn)
    return conn


def connect_with_parameters(token):
    # docs:begin psycopg-parameters
    conn = psycopg.connect(
        host=host,
        port=port,
        dbname=db,
        user="authenticated",
        password=token,  # the user's JWT
        connect_timeout=10,
    )
    # docs:end
    check_encrypted("keyword parameters", conn)
    return conn


# docs:begin psycopg-pool
def pool_for(jwt: str) -> ConnectionPool:
    return ConnectionPool(
        kwargs=dict(host=host, port=port, dbname=db, user="authenticated",
                    password=jwt, connect_timeout=10),
        min_size=0, max_size=10, check=ConnectionPool.check_connection, open=True)
# docs:end


# Sessions of the short-lived token start first, so that they are idle when
# the token runs out; the last step looks at them.
short_lived = {}


@step
def sessions_with_a_short_lived_token_start():
    short_lived["conn"] = connect_with_parameters(SHORT)
    user = short_lived["conn"].execute("select auth.user_id()").fetchone()[0]
    check("a short-lived token connects", user == "alice", user)
    short_lived["conn"].commit()
    short_lived["pool"] = pool_for(SHORT)
    with short_lived["pool"].connection() as conn:
        user = conn.execute("select auth.user_id()").fetchone()[0]
    check("a pool for the short-lived token connects", user == "alice", user)


@step
def connects_both_ways():
    with connect_with_url(ALICE) as conn:
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("connection string: auth.user_id() is alice", user == "alice", user)
    with connect_with_parameters(ALICE) as conn:
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("keyword parameters: auth.user_id() is alice", user == "alice", user)


@step
def queries_and_transactions():
    with connect_with_url(ALICE) as conn:
        row = conn.execute(
            "insert into todos (title) values (%s) returning user_id, title",
            ("psycopg: parameterized",),
        ).fetchone()
        check("parameterized insert fills user_id from the token", row == ("alice", "psycopg: parameterized"), row)
        conn.commit()

        # A server-side prepared statement, reused.
        insert = "insert into todos (title) values (%s) returning id"
        for i in range(3):
            conn.execute(insert, (f"psycopg: prepared {i}",), prepare=True)
        conn.commit()
        prepared = conn.execute(
            "select count(*) from pg_prepared_statements where statement like %s",
            ("insert into todos%",),
        ).fetchone()[0]
        check("the prepared insert is one server-side statement", prepared == 1, prepared)
        count = conn.execute(
            "select count(*) from todos where title like %s", ("psycopg: prepared %",)
        ).fetchone()[0]
        check("the prepared insert ran three times", count == 3, count)
        conn.commit()

        with conn.transaction():
            conn.execute("insert into todos (title) values (%s)", ("psycopg: committed",))
        with conn.transaction():
            conn.execute("insert into todos (title) values (%s)", ("psycopg: rolled back",))
            raise psycopg.Rollback()
        titles = [
            r[0]
            for r in conn.execute(
                "select title from todos where title = any(%s) order by title",
                (["psycopg: committed", "psycopg: rolled back"],),
            )
        ]
        check("the committed transaction stays, the rolled back one does not", titles == ["psycopg: committed"], titles)
        conn.commit()


@step
def sees_only_own_rows():
    with connect_with_parameters(ALICE) as conn:
        owners = [r[0] for r in conn.execute("select distinct user_id from todos")]
        check("alice sees only her own rows", owners == ["alice"], owners)
        conn.commit()
        try:
            conn.execute(
                "insert into todos (user_id, title) values (%s, %s)", ("bob", "psycopg: planted")
            )
            check("an insert for bob is refused", False, "it succeeded")
        except errors.InsufficientPrivilege as e:
            check("an insert for bob is refused with SQLSTATE 42501", e.sqlstate == "42501", e.sqlstate)
            check("the refusal names row-level security", "row-level security" in str(e), e)
        conn.rollback()
        # The session is usable after the error.
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("the session goes on after the refusal", user == "alice", user)
    with connect_with_url(BOB) as conn:
        owners = [r[0] for r in conn.execute("select distinct user_id from todos")]
        check("bob sees only his own rows", owners == ["bob"], owners)


@step
def expired_token_is_refused():
    try:
        connect_with_parameters(EXPIRED).close()
        check("an expired token is refused", False, "it connected")
    except psycopg.OperationalError as e:
        message = str(e)
        check("the refusal says the token expired", "token expired" in message, message)
        check("the refusal is FATAL", "FATAL" in message, message)
        # libpq keeps the error of a failed connection attempt as text only,
        # so psycopg has no SQLSTATE for it (e.sqlstate is None); the other
        # drivers' checks see the 28000 that rlsgate sends.
        check("psycopg reports no SQLSTATE other than 28000", e.sqlstate in (None, "28000"), e.sqlstate)


@step
def pool_serves_concurrent_queries():
    pool = pool_for(ALICE)

    def one(i):
        with pool.connection() as conn:
            row = conn.execute(
                "select auth.user_id(), pg_backend_pid(), %s::int from pg_sleep(0.05)", (i,)
            ).fetchone()
            return (*row, conn.pgconn.ssl_in_use)

    try:
        with ThreadPoolExecutor(max_workers=20) as executor:
            rows = list(executor.map(one, range(20)))
    finally:
        pool.close()
    check("20 concurrent pooled queries all ran", sorted(r[2] for r in rows) == list(range(20)))
    check("every pooled query ran as alice", all(r[0] == "alice" for r in rows), {r[0] for r in rows})
    backends = len({r[1] for r in rows})
    check("the pool used several sessions", backends > 1, backends)
    if SSLMODE == "require":
        check("every pooled connection is encrypted", all(r[3] for r in rows))


@transaction_mode_step
def transaction_mode_refuses_what_it_cannot_keep():
    with connect_with_parameters(ALICE) as conn:
        conn.autocommit = True
        for sql in REFUSED:
            try:
                conn.execute(sql)
                check(f"{sql}: refused", False, "it ran")
            except errors.FeatureNotSupported as e:
                check(f"{sql}: refused with 0A000 naming transaction pooling", names_transaction_pooling(e), e)
            user = conn.execute("select auth.user_id()").fetchone()[0]
            check(f"{sql}: the connection goes on", user == "alice", user)
        with conn.transaction():
            conn.execute("create temp table psycopg_scratch (x int) on commit drop")
            conn.execute("insert into psycopg_scratch values (1), (2)")
            conn.execute("select pg_advisory_xact_lock(4242)")
            count = conn.execute("select count(*) from psycopg_scratch").fetchone()[0]
        check("a temporary table ON COMMIT DROP and an xact lock work in a transaction", count == 2, count)
        conn.execute("notify rlsgate_checks, 'from psycopg'")


# What each transaction of the connection under test reports.
ROUND = (
    "select pg_backend_pid(), auth.user_id(), current_setting('application_name'), "
    "current_setting('search_path'), %s::int"
)
# The same, run without prepare=True: psycopg prepares it once it has run
# prepare_threshold (5) times.
ROUND_BY_THRESHOLD = ROUND + " as by_threshold"


@transaction_mode_step
def settings_and_prepared_statements_follow_the_connection():
    def connect():
        conn = connect_with_parameters(ALICE)
        conn.autocommit = True
        return conn

    conn = connect()
    rotation = Rotation(connect)
    try:
        conn.execute("set application_name = 'psycopg in transaction mode'")
        conn.execute("set search_path = public, auth")
        rows = []
        for i in range(8):
            rows.append(conn.execute(ROUND, (i,), prepare=True).fetchone())
            rotation.turn()
            rows.append(conn.execute(ROUND_BY_THRESHOLD, (i,)).fetchone())
            rotation.turn()
        # Both, run again in one transaction, are prepared on its backend.
        with conn.transaction():
            conn.execute(ROUND, (8,), prepare=True)
            conn.execute(ROUND_BY_THRESHOLD, (8,))
            here = conn.execute(
                "select name from pg_prepared_statements where statement = any(%s)",
                ([ROUND.replace("%s", "$1"), ROUND_BY_THRESHOLD.replace("%s", "$1")],),
            ).fetchall()
    finally:
        rotation.close()
        conn.close()
    want = [("alice", "psycopg in transaction mode", "public, auth", i // 2) for i in range(16)]
    got = [row[1:] for row in rows]
    check("every transaction saw alice and the connection's settings", got == want,
          f"{len(got)} transactions" if got == want else got)
    pids = [row[0] for row in rows]
    moved = sum(a != b for a, b in zip(pids, pids[1:]))
    check("each transaction ran on a different backend from the last", moved == len(pids) - 1, pids)
    check("psycopg's statements are prepared on the backend running them, under names of the proxy's",
          len(here) == 2 and not any(name.startswith("_pg3_") for (name,) in here), here)


@step
def sessions_end_with_their_token():
    time.sleep(max(0.0, SHORT_ENDS_AT + 1 - time.time()))
    conn = short_lived["conn"]
    try:
        conn.execute("select 1")
        check("a query after the token expired fails", False, "the query ran")
    except psycopg.OperationalError as e:
        check("a query after the token expired fails", True, e)
        check("it says the token expired", "token expired" in str(e), e)
        check("its SQLSTATE is 28000", e.sqlstate == "28000", e.sqlstate)
    check("the connection is closed", conn.closed, conn.closed)
    conn.close()

    # The pool's check drops the ended session instead of handing it out; a
    # new one cannot be made with the expired token.
    pool = short_lived["pool"]
    try:
        with pool.connection(timeout=1) as conn:
            conn.execute("select 1")
        check("the pool of the expired token gives no connection", False, "a query ran")
    except PoolTimeout as e:
        check("the pool of the expired token gives no connection", True, e)
    finally:
        lost = pool.get_stats().get("connections_lost", 0)
        pool.close()
    check("the pool's check dropped the ended session", lost == 1, lost)


print(f"psycopg {psycopg.__version__}, libpq {psycopg.pq.version()}")
if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all psycopg checks passed")
