// pgjdbc through rlsgate, used as its users use it: DriverManager with a URL
// and with Properties, a DataSource (what connection pools are configured
// with), PreparedStatement reuse, setAutoCommit(false) with commit and
// rollback, and SQLException.getSQLState().
//
// The connection details come from the environment (tests/integration/clients.rs sets
// them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
// EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy ends
// at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_SSLMODE=require (the
// proxy has a certificate), every connection must be encrypted: pgjdbc's
// default sslmode, prefer, encrypts when the server offers TLS without
// checking the certificate, and each connection's socket is checked to be
// an SSLSocket; one more connection sets sslmode=require explicitly. With
// RLSGATE_POOL_MODE=transaction (the proxy lends its RLSGATE_POOL_SIZE
// backends per transaction), the same checks, and those of transaction
// mode: what it refuses, and a connection's settings and server-side
// prepared statements (past prepareThreshold, and with prepareThreshold=1)
// following it from backend to backend. Exits 0 only if every check
// passed; prints each check.
// Build and run: javac -cp /usr/share/java/postgresql.jar -d out JdbcCheck.java
//                java -cp out:/usr/share/java/postgresql.jar JdbcCheck

import java.lang.reflect.Field;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.Properties;

import javax.net.ssl.SSLSocket;

import org.postgresql.core.BaseConnection;
import org.postgresql.core.PGStream;
import org.postgresql.core.QueryExecutor;
import org.postgresql.core.QueryExecutorBase;
import org.postgresql.ds.PGSimpleDataSource;

public class JdbcCheck {
    static final String host = System.getenv("RLSGATE_HOST");
    static final String port = System.getenv("RLSGATE_PORT");
    static final String db = System.getenv("RLSGATE_DB");
    static final String ALICE = System.getenv("ALICE_TOKEN");
    static final String BOB = System.getenv("BOB_TOKEN");
    static final String EXPIRED = System.getenv("EXPIRED_TOKEN");
    static final String SHORT = System.getenv("SHORT_TOKEN");
    static final long SHORT_ENDS_AT = Long.parseLong(System.getenv("SHORT_TOKEN_ENDS_AT"));
    static final boolean TLS = "require".equals(System.getenv("RLSGATE_SSLMODE"));
    static final boolean TRANSACTION_MODE = "transaction".equals(System.getenv("RLSGATE_POOL_MODE"));
    static final int POOL_SIZE = Integer.parseInt(Objects.requireNonNullElse(System.getenv("RLSGATE_POOL_SIZE"), "0"));

    /** What transaction mode refuses: each fails with SQLSTATE 0A000 and leaves the connection usable. */
    static final List<String> REFUSED = List.of(
            "listen rlsgate_checks",
            "select pg_advisory_lock(4242)",
            "select pg_try_advisory_lock_shared(4242)",
            "declare rlsgate_held cursor with hold for select 1",
            "create temp table rlsgate_scratch (x int)");

    /** What each transaction of the connection under test reports. */
    static final String ROUND = "select pg_backend_pid(), auth.user_id(), current_setting('application_name'), "
            + "current_setting('search_path'), current_setting('extra_float_digits'), ?::int";

    static final List<String> failures = new ArrayList<>();

    static void check(String name, boolean ok, Object detail) {
        System.out.println((ok ? "ok   " : "FAIL ") + name + (detail == null ? "" : ": " + detail));
        if (!ok) {
            failures.add(name);
        }
    }

    /** Whether pgjdbc speaks to the server over TLS on this connection. */
    static boolean encrypted(Connection conn) throws Exception {
        QueryExecutor executor = conn.unwrap(BaseConnection.class).getQueryExecutor();
        Field stream = QueryExecutorBase.class.getDeclaredField("pgStream");
        stream.setAccessible(true);
        return ((PGStream) stream.get(executor)).getSocket() instanceof SSLSocket;
    }

    /** With RLSGATE_SSLMODE=require, the connection must be encrypted. */
    static Connection checkEncrypted(String form, Connection conn) throws SQLException {
        if (TLS) {
            try {
                check(form + ": the connection is encrypted", encrypted(conn), null);
            } catch (Exception e) {
                check(form + ": the connection is encrypted", false, e);
            }
        }
        return conn;
    }

    interface Step {
        void run() throws Exception;
    }

    static void step(String name, Step step) {
        try {
            step.run();
        } catch (Exception e) {
            java.io.StringWriter trace = new java.io.StringWriter();
            e.printStackTrace(new java.io.PrintWriter(trace));
            check(name, false, trace);
        }
    }

    static Connection connectWithUrl(String token) throws SQLException {
        // docs:begin jdbc-url
        String url = "jdbc:postgresql://" + host + ":" + port + "/" + db + "?connectTimeout=10";
        Connection conn = DriverManager.getConnection(url, "authenticated", token);
        // docs:end
        return checkEncrypted("URL", conn);
    }

    static Connection connectWithProperties(String token) throws SQLException {
        // docs:begin jdbc-properties
        Properties props = new Properties();
        props.setProperty("user", "authenticated");
        props.setProperty("password", token); // the user's JWT
        props.setProperty("connectTimeout", "10");
        Connection conn = DriverManager.getConnection("jdbc:postgresql://" + host + ":" + port + "/" + db, props);
        // docs:end
        return checkEncrypted("Properties", conn);
    }

    static Connection connectWithDataSource(String token) throws SQLException {
        // docs:begin jdbc-datasource
        PGSimpleDataSource ds = new PGSimpleDataSource(); // or a pool's DataSource configuration
        ds.setServerNames(new String[] {host});
        ds.setPortNumbers(new int[] {Integer.parseInt(port)});
        ds.setDatabaseName(db);
        ds.setUser("authenticated");
        ds.setPassword(token); // the user's JWT
        ds.setConnectTimeout(10);
        Connection conn = ds.getConnection();
        // docs:end
        return checkEncrypted("DataSource", conn);
    }

    static String one(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static List<String> column(Connection conn, String sql) throws SQLException {
        List<String> values = new ArrayList<>();
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            while (rs.next()) {
                values.add(rs.getString(1));
            }
        }
        return values;
    }

    /**
     * Connections holding all of the proxy's backends but one in open
     * transactions, handed round between two transactions of another
     * connection ({@link #turn}): the idle one takes the only free backend,
     * the one that other connection just used, and the one that has held its
     * backend longest lets go of it. So each transaction of that connection
     * runs on a different backend from its last, one that served another
     * client in between.
     */
    static final class Rotation implements AutoCloseable {
        final List<Connection> holders = new ArrayList<>();
        final ArrayDeque<Connection> busy = new ArrayDeque<>();
        Connection idle;

        Rotation(String token) throws SQLException {
            for (int i = 0; i < POOL_SIZE; i++) {
                holders.add(connectWithProperties(token));
            }
            idle = holders.get(0);
            for (Connection holder : holders.subList(1, holders.size())) {
                hold(holder);
                busy.add(holder);
            }
        }

        static void hold(Connection conn) throws SQLException {
            conn.setAutoCommit(false);
            one(conn, "select pg_backend_pid()");
        }

        void turn() throws SQLException {
            hold(idle);
            busy.add(idle);
            idle = busy.poll();
            idle.commit();
        }

        @Override
        public void close() throws SQLException {
            for (Connection conn : holders) {
                conn.close();
            }
        }
    }

    /** `run` fails with 0A000 naming transaction pooling, and `conn` goes on. */
    static void refused(Connection conn, String what, Step run) throws SQLException {
        try {
            run.run();
            check(what + ": refused", false, "it ran");
        } catch (Exception e) {
            String state = e instanceof SQLException ? ((SQLException) e).getSQLState() : null;
            String message = Objects.toString(e.getMessage());
            check(what + ": refused with 0A000 naming transaction pooling",
                    "0A000".equals(state) && message.toLowerCase().contains("transaction pool"), state + ": " + message);
        }
        String user = one(conn, "select auth.user_id()");
        check(what + ": the connection goes on", "alice".equals(user), user);
    }

    static void transactionModeRefusals() throws Exception {
        try (Connection conn = connectWithProperties(ALICE)) {
            for (String sql : REFUSED) {
                refused(conn, sql, () -> {
                    try (Statement st = conn.createStatement()) {
                        st.execute(sql);
                    }
                });
            }
            // Past prepareThreshold, as a named server-side statement too.
            try (PreparedStatement ps = conn.prepareStatement("select pg_advisory_lock(?)")) {
                for (int i = 0; i < 6; i++) {
                    ps.setLong(1, 4242);
                    refused(conn, "a prepared lock, execution " + (i + 1), () -> ps.executeQuery().close());
                }
            }
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("create temp table jdbc_scratch (x int) on commit drop");
                st.execute("insert into jdbc_scratch values (1), (2)");
                st.execute("select pg_advisory_xact_lock(4242)");
            }
            String count = one(conn, "select count(*) from jdbc_scratch");
            conn.commit();
            conn.setAutoCommit(true);
            check("a temporary table ON COMMIT DROP and an xact lock work in a transaction", "2".equals(count), count);
            try (Statement st = conn.createStatement()) {
                st.execute("notify rlsgate_checks, 'from pgjdbc'");
            }
        }
    }

    /** The connection's SET and its PreparedStatement over transactions that each run on another backend. */
    static void settingsAndStatementsFollow(String what, String urlOptions) throws Exception {
        String url = "jdbc:postgresql://" + host + ":" + port + "/" + db + "?connectTimeout=10" + urlOptions;
        List<Integer> pids = new ArrayList<>();
        List<String> wrong = new ArrayList<>();
        List<String> here;
        try (Connection conn = DriverManager.getConnection(url, "authenticated", ALICE);
                Rotation rotation = new Rotation(ALICE)) {
            try (Statement st = conn.createStatement()) {
                st.execute("set application_name = 'pgjdbc in transaction mode'");
                st.execute("set search_path = public, auth");
            }
            try (PreparedStatement ps = conn.prepareStatement(ROUND)) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        pids.add(rs.getInt(1));
                        String got = rs.getString(2) + "|" + rs.getString(3) + "|" + rs.getString(4) + "|"
                                + rs.getString(5) + "|" + rs.getInt(6);
                        if (!got.equals("alice|pgjdbc in transaction mode|public, auth|3|" + i)) {
                            wrong.add(got);
                        }
                    }
                    rotation.turn();
                }
                // Run again in one transaction, it is prepared on that transaction's backend.
                conn.setAutoCommit(false);
                ps.setInt(1, 10);
                ps.executeQuery().close();
                here = new ArrayList<>();
                try (PreparedStatement names = conn.prepareStatement(
                        "select name from pg_prepared_statements where statement = ?")) {
                    names.setString(1, ROUND.replace("?", "$1"));
                    try (ResultSet rs = names.executeQuery()) {
                        while (rs.next()) {
                            here.add(rs.getString(1));
                        }
                    }
                }
                conn.commit();
            }
        }
        check(what + ": every transaction saw alice and the connection's settings", wrong.isEmpty(), wrong);
        int moved = 0;
        for (int i = 1; i < pids.size(); i++) {
            moved += pids.get(i).equals(pids.get(i - 1)) ? 0 : 1;
        }
        check(what + ": each transaction ran on a different backend from the last", moved == pids.size() - 1, pids);
        check(what + ": the statement is prepared on the backend running it, under a name of the proxy's",
                here.size() == 1 && !here.get(0).startsWith("S_"), here);
    }

    public static void main(String[] args) {
        // A session of the short-lived token starts first, so that it is idle
        // when the token runs out; the last step looks at it.
        Connection[] shortLived = new Connection[1];
        step("a session with a short-lived token starts", () -> {
            shortLived[0] = connectWithProperties(SHORT);
            String user = one(shortLived[0], "select auth.user_id()");
            check("a short-lived token connects", "alice".equals(user), user);
        });

        step("connects both ways", () -> {
            try (Connection conn = connectWithUrl(ALICE)) {
                String user = one(conn, "select auth.user_id()");
                check("URL: auth.user_id() is alice", "alice".equals(user), user);
            }
            try (Connection conn = connectWithProperties(ALICE)) {
                String user = one(conn, "select auth.user_id()");
                check("Properties: auth.user_id() is alice", "alice".equals(user), user);
            }
            try (Connection conn = connectWithDataSource(ALICE)) {
                String user = one(conn, "select auth.user_id()");
                check("DataSource: auth.user_id() is alice", "alice".equals(user), user);
            }
        });

        if (TLS) {
            step("sslmode=require", () -> {
                String url = "jdbc:postgresql://" + host + ":" + port + "/" + db + "?connectTimeout=10&sslmode=require";
                try (Connection conn = DriverManager.getConnection(url, "authenticated", ALICE)) {
                    check("sslmode=require connects without checking the certificate", encrypted(conn), null);
                    String user = one(conn, "select auth.user_id()");
                    check("sslmode=require: auth.user_id() is alice", "alice".equals(user), user);
                }
            });
        }

        step("queries and transactions", () -> {
            try (Connection conn = connectWithUrl(ALICE)) {
                try (PreparedStatement ps = conn.prepareStatement(
                        "insert into todos (title) values (?) returning user_id")) {
                    ps.setString(1, "jdbc: parameterized");
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check("parameterized insert fills user_id from the token",
                                "alice".equals(rs.getString(1)), rs.getString(1));
                    }
                }
                try (PreparedStatement ps = conn.prepareStatement("select count(*) from todos where title = ?")) {
                    ps.setString(1, "jdbc: parameterized");
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check("parameterized select finds the row", rs.getInt(1) == 1, rs.getInt(1));
                    }
                }

                // One PreparedStatement reused; past prepareThreshold (5)
                // executions pgjdbc switches to a named server-side statement.
                try (PreparedStatement ps = conn.prepareStatement("insert into todos (title) values (?)")) {
                    for (int i = 0; i < 7; i++) {
                        ps.setString(1, "jdbc: prepared " + i);
                        ps.executeUpdate();
                    }
                    // A batch through the same statement.
                    for (int i = 0; i < 3; i++) {
                        ps.setString(1, "jdbc: batch " + i);
                        ps.addBatch();
                    }
                    int[] counts = ps.executeBatch();
                    check("the batch inserted three rows", counts.length == 3, counts.length);
                }
                String named = one(conn,
                        "select count(*) from pg_prepared_statements where statement = 'insert into todos (title) values ($1)'");
                check("the reused statement is prepared on the server", "1".equals(named), named);
                String reused = one(conn, "select count(*) from todos where title like 'jdbc: prepared %'");
                check("the reused statement ran seven times", "7".equals(reused), reused);

                conn.setAutoCommit(false);
                try (PreparedStatement ps = conn.prepareStatement("insert into todos (title) values (?)")) {
                    ps.setString(1, "jdbc: committed");
                    ps.executeUpdate();
                    conn.commit();
                    ps.setString(1, "jdbc: rolled back");
                    ps.executeUpdate();
                    conn.rollback();
                }
                conn.setAutoCommit(true);
                List<String> titles = column(conn,
                        "select title from todos where title in ('jdbc: committed', 'jdbc: rolled back') order by title");
                check("the committed transaction stays, the rolled back one does not",
                        titles.equals(List.of("jdbc: committed")), titles);
            }
        });

        step("sees only own rows", () -> {
            try (Connection conn = connectWithProperties(ALICE)) {
                List<String> owners = column(conn, "select distinct user_id from todos");
                check("alice sees only her own rows", owners.equals(List.of("alice")), owners);
                try (PreparedStatement ps = conn.prepareStatement(
                        "insert into todos (user_id, title) values (?, ?)")) {
                    ps.setString(1, "bob");
                    ps.setString(2, "jdbc: planted");
                    ps.executeUpdate();
                    check("an insert for bob is refused", false, "it succeeded");
                } catch (SQLException e) {
                    check("an insert for bob is refused with SQLSTATE 42501",
                            "42501".equals(e.getSQLState()), e.getSQLState());
                    check("the refusal names row-level security",
                            Objects.toString(e.getMessage()).contains("row-level security"), e.getMessage());
                }
                String user = one(conn, "select auth.user_id()");
                check("the session goes on after the refusal", "alice".equals(user), user);
            }
            try (Connection conn = connectWithUrl(BOB)) {
                List<String> owners = column(conn, "select distinct user_id from todos");
                check("bob sees only his own rows", owners.equals(List.of("bob")), owners);
            }
        });

        step("expired token is refused", () -> {
            try (Connection conn = connectWithUrl(EXPIRED)) {
                check("an expired token is refused", false, "it connected");
            } catch (SQLException e) {
                check("the refusal has SQLSTATE 28000", "28000".equals(e.getSQLState()), e.getSQLState());
                check("the refusal says the token expired",
                        Objects.toString(e.getMessage()).contains("token expired"), e.getMessage());
            }
        });

        if (TRANSACTION_MODE) {
            step("transaction mode refuses what it cannot keep", JdbcCheck::transactionModeRefusals);
            step("settings and statements follow the connection",
                    () -> settingsAndStatementsFollow("prepareThreshold reached", ""));
            step("settings and statements follow the connection, prepareThreshold=1",
                    () -> settingsAndStatementsFollow("prepareThreshold=1", "&prepareThreshold=1"));
        }

        step("sessions end with their token", () -> {
            long wait = SHORT_ENDS_AT * 1000 + 1000 - System.currentTimeMillis();
            if (wait > 0) {
                Thread.sleep(wait);
            }
            try (Connection conn = shortLived[0]) {
                one(conn, "select 1");
                check("a query after the token expired fails", false, "the query ran");
            } catch (SQLException e) {
                check("a query after the token expired fails with SQLSTATE 28000",
                        "28000".equals(e.getSQLState()), e.getSQLState() + ": " + e.getMessage());
                check("it says the token expired",
                        Objects.toString(e.getMessage()).contains("token expired"), e.getMessage());
            }
            check("the connection is closed", shortLived[0].isClosed(), null);
        });

        System.out.println("pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION);
        if (!failures.isEmpty()) {
            System.out.println(failures.size() + " check(s) failed: " + String.join(", ", failures));
            System.exit(1);
        }
        System.out.println("all JDBC checks passed");
    }
}
