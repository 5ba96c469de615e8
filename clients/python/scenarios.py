"""Scenarios of psycopg 3's own test suite, through rlsgate.

Modelled on psycopg's test_notify, test_broken, test_concurrent_close and
its cancel tests, which need the backend pid a client is told
(conn.info.backend_pid) to be the server's, and cancel requests to work:

- notifications carry the sender's backend pid, so a client recognises its
  own (n.pid == conn.info.backend_pid);
- conn.cancel() and conn.cancel_safe() from another thread cancel a running
  query, and abandoning a cursor's stream() mid-way makes psycopg cancel the
  rest; the connection is reused afterwards;
- closing a connection from another thread while a query runs ends the query
  and its backend;
- pg_terminate_backend(conn.info.backend_pid), from the connection itself or
  another one, leaves the connection broken (conn.broken), and a new one works.

With RLSGATE_POOL_MODE=transaction the proxy lends a backend per
transaction, so a connection has no backend of its own while idle: LISTEN
and session advisory locks are refused (SQLSTATE 0A000), which the
scenarios check instead of using them (the stream holds its lock with
pg_advisory_xact_lock in a transaction); a running query's backend is found
by its text rather than by conn.info.backend_pid; and a backend is
terminated while the connection's transaction runs on it. An idle
connection whose last backend is terminated goes on.

The connection details come from the environment (tests/integration/clients.rs sets
them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN, and
RLSGATE_POOL_MODE, the proxy's pool mode. Exits 0 only if every check
passed; prints each check.
"""

import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

from transaction_mode import POOL_MODE, TRANSACTION_MODE, names_transaction_pooling

host = os.environ["RLSGATE_HOST"]
port = os.environ["RLSGATE_PORT"]
db = os.environ["RLSGATE_DB"]
ALICE = os.environ["ALICE_TOKEN"]
BOB = os.environ["BOB_TOKEN"]

# How long any one wait may take before it is a failure, in seconds.
WAIT = 10

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail else ''}")
    if not ok:
        failures.append(name)


def step(fn):
    """Runs one scenario; an unexpected exception fails it."""
    try:
        fn()
    except Exception:
        check(fn.__name__, False, traceback.format_exc())
    return fn


def transaction_mode_step(fn):
    """A scenario of transaction mode only, where an idle connection holds no
    backend."""
    return step(fn) if TRANSACTION_MODE else fn


def connect(token):
    return psycopg.connect(
        host=host,
        port=port,
        dbname=db,
        user="authenticated",
        password=token,
        connect_timeout=WAIT,
        autocommit=True,
    )


def wait_for_backend(monitor, pid, condition):
    """Whether `condition` (SQL on pg_stat_activity, with the pid as its
    parameter) comes true within WAIT, as seen through `monitor`."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if monitor.execute(condition, [pid]).fetchone()[0]:
            return True
        time.sleep(0.02)
    return False


def until_gone(monitor, pid):
    return wait_for_backend(
        monitor, pid, "select not exists (select from pg_stat_activity where pid = %s)"
    )


# Tells this run's statements from those of runs beside it on the same
# database (the test suite runs the scenarios in each pool mode at once):
# running_backend finds a statement by its text.
RUN = os.getpid()


def running_backend(monitor, conn, query):
    """The pid of the backend running `query` (its exact text), once it runs,
    as seen through `monitor`; None if it does not run within WAIT. Without
    transaction pooling it must be conn.info.backend_pid."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        row = monitor.execute(
            "select pid from pg_stat_activity where query = %s and state = 'active'", [query]
        ).fetchone()
        if row:
            if not TRANSACTION_MODE:
                check("the query runs on conn.info.backend_pid", row[0] == conn.info.backend_pid, row[0])
            return row[0]
        time.sleep(0.02)
    return None


def refused(conn, sql):
    """`sql`, which transaction mode refuses: SQLSTATE 0A000 naming transaction
    pooling, and the connection goes on."""
    try:
        conn.execute(sql)
        check(f"{sql}: refused in transaction mode", False, "it ran")
    except errors.FeatureNotSupported as e:
        check(f"{sql}: refused with 0A000 naming transaction pooling", names_transaction_pooling(e), e)
    user = conn.execute("select auth.user_id()").fetchone()[0]
    check(f"{sql}: the connection goes on", user in ("alice", "bob"), user)


def in_thread(fn):
    """Runs `fn` in a daemon thread; returns the thread and a dict that gets
    what it returned ("result") or raised ("error")."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except Exception as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@step
def backend_pid_is_the_servers():
    with connect(ALICE) as conn:
        # In transaction mode: the backend it logged in on, which the proxy
        # lends it first; later transactions may run on others.
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        check("conn.info.backend_pid is pg_backend_pid()", conn.info.backend_pid == pid, (conn.info.backend_pid, pid))


@step
def notifications_name_their_sender():
    if TRANSACTION_MODE:
        with connect(ALICE) as conn, connect(BOB) as other:
            refused(conn, "listen scenarios")
            other.execute("notify scenarios, 'from bob'")
            check("NOTIFY works in transaction mode", True)
        return
    with connect(ALICE) as conn, connect(BOB) as other:
        conn.execute("listen scenarios")
        other.execute("notify scenarios, 'from bob'")
        got = list(conn.notifies(timeout=WAIT, stop_after=1))
        check(
            "a notification carries its sender's conn.info.backend_pid",
            [(n.pid, n.payload) for n in got] == [(other.info.backend_pid, "from bob")],
            got,
        )
        conn.execute("notify scenarios, 'own'")
        got = list(conn.notifies(timeout=WAIT, stop_after=1))
        own = [n.payload for n in got if n.pid == conn.info.backend_pid]
        check("a connection recognises its own notification by n.pid == conn.info.backend_pid", own == ["own"], got)


def how_it_ended(outcome):
    """What became of a query run with `in_thread`, for a check's detail."""
    if "error" in outcome:
        return repr(outcome["error"])
    return "it completed" if "result" in outcome else "it is still running"


def cancelled_while_running(cancel):
    """Runs pg_sleep(15) on a connection, calls `cancel(conn)` from this
    thread once it runs, and checks it ends with QueryCanceled and that the
    connection is usable afterwards."""
    query = f"select pg_sleep(15) as {cancel.__name__}_{RUN}"
    with connect(ALICE) as conn, connect(BOB) as monitor:
        thread, outcome = in_thread(lambda: conn.execute(query))
        check(f"{cancel.__name__}: the query is running", running_backend(monitor, conn, query))
        cancel(conn)
        thread.join(20)
        check(
            f"{cancel.__name__}: the query ends with QueryCanceled (57014)",
            isinstance(outcome.get("error"), errors.QueryCanceled),
            how_it_ended(outcome),
        )
        user = user_after_cancel(conn)
        check(f"{cancel.__name__}: the connection is used again afterwards", user == "alice", user)


def user_after_cancel(conn):
    """auth.user_id() on a connection whose statement was just cancelled.
    PostgreSQL signals a cancelled backend twice (the process, then its
    process group); on a busy machine the second can come late enough to
    cancel the next statement too, which may then be retried once."""
    try:
        return conn.execute("select auth.user_id()").fetchone()[0]
    except errors.QueryCanceled:
        return conn.execute("select auth.user_id()").fetchone()[0]


@step
def cancel_from_another_thread():
    def cancel(conn):
        conn.cancel()

    def cancel_safe(conn):
        conn.cancel_safe(timeout=WAIT)

    cancelled_while_running(cancel)
    cancelled_while_running(cancel_safe)


@step
def abandoning_a_stream_cancels_the_rest():
    # The streamed query sends three rows, then waits for a lock `holder`
    # has: only a cancel ends that wait. If none comes within WAIT, the
    # watchdog lets the query finish, and the check below fails.
    with connect(ALICE) as conn, connect(BOB) as holder:
        if TRANSACTION_MODE:
            refused(holder, "select pg_advisory_lock(4242)")
            holder.execute("begin")
            holder.execute("select pg_advisory_xact_lock(4242)")
            unlock = "commit"
        else:
            holder.execute("select pg_advisory_lock(4242)")
            unlock = "select pg_advisory_unlock(4242)"
        abandoned = threading.Event()
        released = threading.Event()

        def watchdog():
            if not abandoned.wait(WAIT):
                released.set()
                holder.execute(unlock)

        threading.Thread(target=watchdog, daemon=True).start()
        with conn.cursor() as cur:
            # Rows over 8 kB leave the server one by one.
            rows = cur.stream(
                "select x, repeat('x', 10000), "
                "case when x > 3 then pg_advisory_xact_lock(4242)::text end "
                "from generate_series(1, 6) x"
            )
            first = next(rows)[0]
            rows.close()
        abandoned.set()
        check("stream(): the first row arrives", first == 1, first)
        check("stream(): abandoning it makes psycopg cancel the query", not released.is_set())
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("stream(): the connection is used again afterwards", user == "alice", user)
        if not released.is_set():
            holder.execute(unlock)


@step
def close_from_another_thread_while_a_query_runs():
    query = f"select pg_sleep(15) as concurrent_close_{RUN}"
    with connect(BOB) as monitor:
        conn = connect(ALICE)
        thread, outcome = in_thread(lambda: conn.execute(query))
        pid = running_backend(monitor, conn, query)
        check("concurrent close: the query is running", pid)
        conn.close()
        thread.join(WAIT)
        check("concurrent close: the query's thread returns", not thread.is_alive())
        # libpq is not thread-safe on one connection: depending on where the
        # query's thread is when the close lands, psycopg reports the closed
        # connection as OperationalError or as InternalError ("got no result
        # from the query"), as it does on a direct connection.
        check(
            "concurrent close: the query fails with OperationalError or InternalError",
            isinstance(outcome.get("error"), (psycopg.OperationalError, psycopg.InternalError)),
            how_it_ended(outcome),
        )
        check("concurrent close: the connection is closed", conn.closed)
        check("concurrent close: its backend ends too", until_gone(monitor, pid), pid)
    with connect(ALICE) as conn:
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("concurrent close: a new connection works", user == "alice", user)


@step
def a_terminated_backend_breaks_the_connection():
    conn = connect(ALICE)
    try:
        if TRANSACTION_MODE:  # the backend running this statement
            conn.execute("select pg_terminate_backend(pg_backend_pid())")
        else:
            conn.execute("select pg_terminate_backend(%s)", [conn.info.backend_pid])
        check("broken: terminating its own backend raises", False, "it returned")
    except psycopg.OperationalError as e:
        check("broken: terminating its own backend raises OperationalError", True, type(e).__name__)
    check("broken: the connection is closed and broken", conn.closed and conn.broken, (conn.closed, conn.broken))
    conn.close()
    check("broken: closing it leaves it broken", conn.broken)

    with connect(BOB) as other:
        conn = connect(ALICE)
        if TRANSACTION_MODE:
            # The connection has a backend while its transaction runs.
            conn.execute("begin")
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        else:
            pid = conn.info.backend_pid
        ended = other.execute("select pg_terminate_backend(%s)", [pid]).fetchone()[0]
        check("broken: pg_terminate_backend of its backend from another connection finds it", ended is True)
        check("broken: the backend ends", until_gone(other, pid), pid)
        try:
            conn.execute("select 1")
            check("broken: a query on the terminated connection fails", False, "it ran")
        except psycopg.OperationalError as e:
            check("broken: a query on the terminated connection fails with OperationalError", True, type(e).__name__)
        check("broken: the connection is broken", conn.broken)
        conn.close()
    with connect(ALICE) as conn:
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("broken: a new connection works", user == "alice", user)


@transaction_mode_step
def an_idle_connection_outlives_its_last_backend():
    with connect(BOB) as other, connect(ALICE) as conn:
        # `other` holds a backend of its own, so the one conn uses is another.
        other.execute("begin")
        other.execute("select pg_backend_pid()")
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        other.execute("select pg_terminate_backend(%s)", [pid])
        other.execute("commit")  # pg_stat_activity is read once per transaction
        check("idle: the backend it used last ends", until_gone(other, pid), pid)
        user = conn.execute("select auth.user_id()").fetchone()[0]
        check("idle: the connection goes on, on another backend", user == "alice" and not conn.broken, user)


print(f"psycopg {psycopg.__version__}, libpq {psycopg.pq.version()}, pool mode {POOL_MODE}")
if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all psycopg scenarios passed")
