// node-postgres (`pg`: Client and Pool) through rlsgate, used as its users use it.
//
// The connection details come from the environment (tests/integration/clients.rs sets
// them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
// EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy
// ends at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_SSLMODE=require
// (the proxy has a certificate), every connection is encrypted without
// checking the certificate: node-postgres reads PGSSLMODE=no-verify as
// `ssl: { rejectUnauthorized: false }` (none of the configurations below
// sets `ssl`), and each connection's socket is checked to be a TLS one.
// With RLSGATE_POOL_MODE=transaction (the proxy lends its RLSGATE_POOL_SIZE
// backends per transaction), the same checks, and those of transaction
// mode: what it refuses, and a client's settings and named statements
// following it from backend to backend.
// Exits 0 only if every check passed; prints each check.
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import pg from 'pg';

import {
  POOL_SIZE, REFUSED, Rotation, TRANSACTION_MODE, moves, namesTransactionPooling,
} from './transaction_mode.js';

const host = process.env.RLSGATE_HOST;
const port = Number(process.env.RLSGATE_PORT);
const db = process.env.RLSGATE_DB;
const ALICE = process.env.ALICE_TOKEN;
const BOB = process.env.BOB_TOKEN;
const EXPIRED = process.env.EXPIRED_TOKEN;
const SHORT = process.env.SHORT_TOKEN;
const SHORT_ENDS_AT = Number(process.env.SHORT_TOKEN_ENDS_AT);
const TLS = process.env.RLSGATE_SSLMODE === 'require';
if (TLS) process.env.PGSSLMODE = 'no-verify';
else delete process.env.PGSSLMODE;

const failures = [];

function check(name, ok, detail) {
  const shown = detail === undefined ? '' : `: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${shown}`);
  if (!ok) failures.push(name);
}

// With RLSGATE_SSLMODE=require, the client's connection must be encrypted.
function checkEncrypted(form, client) {
  if (TLS) check(`${form}: the connection is encrypted`, client.connection.stream.encrypted === true);
}

async function step(name, fn) {
  try {
    await fn();
  } catch (e) {
    check(name, false, e?.stack ?? String(e));
  }
}

// A group of checks of transaction mode, run only in it.
async function transactionModeStep(name, fn) {
  if (TRANSACTION_MODE) await step(name, fn);
}

async function connectWithUrl(jwt) {
  // docs:begin node-pg-url
  const client = new pg.Client({
    connectionString: `postgresql://authenticated:${jwt}@${host}:${port}/${db}`,
    connectionTimeoutMillis: 10_000,
  });
  await client.connect();
  // docs:end
  checkEncrypted('connection string', client);
  return client;
}

async function connectWithParameters(jwt) {
  // docs:begin node-pg-parameters
  const client = new pg.Client({
    host,
    port,
    database: db,
    user: 'authenticated',
    password: jwt, // the user's token
    connectionTimeoutMillis: 10_000,
  });
  await client.connect();
  // docs:end
  checkEncrypted('parameters', client);
  return client;
}

// docs:begin node-pg-pool
const connection = { host, port, database: db, connectionTimeoutMillis: 10_000 };
const pools = new Map(); // token -> pg.Pool

function poolFor(jwt) {
  let pool = pools.get(jwt);
  if (pool) return pool;
  pool = new pg.Pool({
    ...connection, user: 'authenticated', password: jwt,
    max: 10, idleTimeoutMillis: 10_000,
  });
  // Needed: the proxy ends idle sessions when the token expires, and an
  // 'error' event without a listener ends the process.
  pool.on('error', (err) => console.warn('session ended:', err.message));
  pools.set(jwt, pool);
  const { exp } = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url'));
  const ms = Math.min(Math.max(exp * 1000 - Date.now(), 0), 2 ** 31 - 1);
  setTimeout(() => { pools.delete(jwt); pool.end(); }, ms).unref();
  return pool;
}
// docs:end

// Sessions of the short-lived token start first, so that they are idle
// when the token runs out; the last step looks at them.
const shortLived = { client: null, clientErrors: [], pool: null, poolErrors: [] };
await step('sessions with a short-lived token start', async () => {
  shortLived.client = await connectWithParameters(SHORT);
  shortLived.client.on('error', (e) => shortLived.clientErrors.push(e));
  const { rows } = await shortLived.client.query('select auth.user_id() as user_id');
  check('a short-lived token connects', rows[0].user_id === 'alice', rows[0].user_id);
  shortLived.pool = poolFor(SHORT);
  shortLived.pool.on('error', (e) => shortLived.poolErrors.push(e));
  const pooled = await shortLived.pool.query('select auth.user_id() as user_id');
  check('a pool for the short-lived token connects', pooled.rows[0].user_id === 'alice', pooled.rows[0].user_id);
});

await step('connects both ways', async () => {
  for (const [form, connect] of [['connection string', connectWithUrl], ['parameters', connectWithParameters]]) {
    const client = await connect(ALICE);
    try {
      const { rows } = await client.query('select auth.user_id() as user_id');
      check(`${form}: auth.user_id() is alice`, rows[0].user_id === 'alice', rows[0].user_id);
    } finally {
      await client.end();
    }
  }
});

await step('queries and transactions', async () => {
  const client = await connectWithUrl(ALICE);
  try {
    const inserted = await client.query(
      'insert into todos (title) values ($1) returning user_id, title',
      ['node-pg: parameterized'],
    );
    check('parameterized insert fills user_id from the token', inserted.rows[0].user_id === 'alice', inserted.rows[0]);

    const selected = await client.query('select title from todos where title = $1', ['node-pg: parameterized']);
    check('parameterized select finds the row', selected.rowCount === 1, selected.rowCount);

    // A named query is prepared once on the session and reused.
    for (let i = 0; i < 3; i++) {
      await client.query({
        name: 'insert-todo',
        text: 'insert into todos (title) values ($1)',
        values: [`node-pg: prepared ${i}`],
      });
    }
    const prepared = await client.query(
      'select name from pg_prepared_statements where statement = $1',
      ['insert into todos (title) values ($1)'],
    );
    const names = prepared.rows.map((r) => r.name);
    if (TRANSACTION_MODE) {
      // On the backend the client used last, which the proxy prefers.
      check("the named statement is prepared once, under a name of the proxy's",
        names.length === 1 && names[0] !== 'insert-todo', names);
    } else {
      check('the named statement is prepared once', JSON.stringify(names) === '["insert-todo"]', names);
    }
    const reused = await client.query('select count(*)::int as n from todos where title like $1', ['node-pg: prepared %']);
    check('the named statement ran three times', reused.rows[0].n === 3, reused.rows[0].n);

    await client.query('begin');
    await client.query('insert into todos (title) values ($1)', ['node-pg: committed']);
    await client.query('commit');
    await client.query('begin');
    await client.query('insert into todos (title) values ($1)', ['node-pg: rolled back']);
    await client.query('rollback');
    const kept = await client.query(
      'select title from todos where title = any($1) order by title',
      [['node-pg: committed', 'node-pg: rolled back']],
    );
    const titles = kept.rows.map((r) => r.title);
    check('the committed transaction stays, the rolled back one does not',
      JSON.stringify(titles) === JSON.stringify(['node-pg: committed']), titles);
  } finally {
    await client.end();
  }
});

await step('sees only own rows', async () => {
  const client = await connectWithParameters(ALICE);
  try {
    const owners = (await client.query('select distinct user_id from todos')).rows.map((r) => r.user_id);
    check('alice sees only her own rows', JSON.stringify(owners) === '["alice"]', owners);
    try {
      await client.query('insert into todos (user_id, title) values ($1, $2)', ['bob', 'node-pg: planted']);
      check('an insert for bob is refused', false, 'it succeeded');
    } catch (e) {
      check('an insert for bob is refused with SQLSTATE 42501', e.code === '42501', e.code);
      check('the refusal names row-level security', /row-level security/.test(e.message), e.message);
    }
    const again = await client.query('select auth.user_id() as user_id');
    check('the session goes on after the refusal', again.rows[0].user_id === 'alice', again.rows[0].user_id);
  } finally {
    await client.end();
  }
  const bob = await connectWithUrl(BOB);
  try {
    const owners = (await bob.query('select distinct user_id from todos')).rows.map((r) => r.user_id);
    check('bob sees only his own rows', JSON.stringify(owners) === '["bob"]', owners);
  } finally {
    await bob.end();
  }
});

await step('expired token is refused', async () => {
  try {
    const client = await connectWithParameters(EXPIRED);
    check('an expired token is refused', false, 'it connected');
    await client.end();
  } catch (e) {
    check('the refusal has SQLSTATE 28000', e.code === '28000', e.code);
    check('the refusal is FATAL', e.severity === 'FATAL', e.severity);
    check('the refusal says the token expired', /token expired/.test(e.message), e.message);
  }
});

await step('pool serves concurrent queries', async () => {
  const pool = poolFor(ALICE);
  const results = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      pool.query('select auth.user_id() as user_id, pg_backend_pid() as pid, $1::int as i from pg_sleep(0.05)', [i]),
    ),
  );
  const rows = results.map((r) => r.rows[0]);
  check('20 concurrent pooled queries all ran',
    JSON.stringify(rows.map((r) => r.i).sort((a, b) => a - b)) === JSON.stringify([...Array(20).keys()]));
  check('every pooled query ran as alice', rows.every((r) => r.user_id === 'alice'), [...new Set(rows.map((r) => r.user_id))]);
  const sessions = new Set(rows.map((r) => r.pid)).size;
  check('the pool used several sessions', sessions > 1, sessions);
  check('poolFor gives the same pool for the same token', poolFor(ALICE) === pool);
  const pooled = await pool.connect();
  checkEncrypted('pooled', pooled);
  pooled.release();
  pools.delete(ALICE);
  await pool.end();
});

await transactionModeStep('transaction mode refuses what it cannot keep', async () => {
  const client = await connectWithParameters(ALICE);
  try {
    const named = { name: 'lock', text: 'select pg_advisory_lock($1)', values: [4242] };
    const refused = [...REFUSED.map((sql) => [sql, sql]), ['named lock', named], ['named lock again', named]];
    for (const [what, query] of refused) {
      try {
        await client.query(query);
        check(`${what}: refused`, false, 'it ran');
      } catch (e) {
        check(`${what}: refused with 0A000 naming transaction pooling`,
          e.code === '0A000' && namesTransactionPooling(e), `${e.code}: ${e.message}`);
      }
      const { rows } = await client.query('select auth.user_id() as user_id');
      check(`${what}: the connection goes on`, rows[0].user_id === 'alice', rows[0].user_id);
    }
    await client.query('begin');
    await client.query('create temp table node_scratch (x int) on commit drop');
    await client.query('insert into node_scratch values ($1), ($2)', [1, 2]);
    await client.query('select pg_advisory_xact_lock(4242)');
    const { rows } = await client.query('select count(*)::int as n from node_scratch');
    await client.query('commit');
    check('a temporary table ON COMMIT DROP and an xact lock work in a transaction', rows[0].n === 2, rows[0].n);
    await client.query("notify rlsgate_checks, 'from node-postgres'");
  } finally {
    await client.end();
  }
});

// What each transaction of the client under test reports.
const ROUND = 'select pg_backend_pid() as pid, auth.user_id() as user_id, '
  + "current_setting('application_name') as app, current_setting('search_path') as path, $1::int as i";

await transactionModeStep('settings and named statements follow the client', async () => {
  const client = await connectWithParameters(ALICE);
  const holders = [];
  try {
    for (let i = 0; i < POOL_SIZE; i++) holders.push(await connectWithParameters(ALICE));
    const rotation = await Rotation.start(holders.map((h) => (sql) => h.query(sql)));
    await client.query("set application_name = 'node-postgres in transaction mode'");
    await client.query('set search_path = public, auth');
    const rows = [];
    for (let i = 0; i < 12; i++) {
      rows.push((await client.query({ name: 'round', text: ROUND, values: [i] })).rows[0]);
      await rotation.turn();
    }
    // Run again in one transaction, it is prepared on that transaction's backend.
    await client.query('begin');
    await client.query({ name: 'round', text: ROUND, values: [12] });
    const here = await client.query('select name from pg_prepared_statements where statement = $1', [ROUND]);
    await client.query('commit');
    const got = rows.map(({ user_id, app, path, i }) => [user_id, app, path, i]);
    const want = rows.map((_, i) => ['alice', 'node-postgres in transaction mode', 'public, auth', i]);
    const same = JSON.stringify(got) === JSON.stringify(want);
    check("every transaction saw alice and the client's settings", same, same ? `${got.length} transactions` : got);
    const pids = rows.map((r) => r.pid);
    check('each transaction ran on a different backend from the last', moves(pids) === pids.length - 1, pids);
    const names = here.rows.map((r) => r.name);
    check("the named query is prepared on the backend running it, under a name of the proxy's",
      names.length === 1 && names[0] !== 'round', names);
  } finally {
    await Promise.all([client, ...holders].map((c) => c.end()));
  }
});

await step('sessions end with their token', async () => {
  const wait = SHORT_ENDS_AT * 1000 + 1000 - Date.now();
  if (wait > 0) await sleep(wait);
  const ended = shortLived.clientErrors[0];
  check('an idle client gets the error event', ended !== undefined);
  check('its SQLSTATE is 28000', ended?.code === '28000', ended?.code);
  check('it says the token expired', /token expired/.test(ended?.message), ended?.message);
  try {
    await shortLived.client.query('select 1');
    check('the ended client refuses queries', false, 'the query ran');
  } catch (e) {
    check('the ended client refuses queries', true, e.message);
  }
  // poolFor closed the token's pool at its exp, before the proxy's leeway ran out.
  check('the pool of the expired token is closed', shortLived.pool.ended && !pools.has(SHORT));
  check('the pool saw no error', shortLived.poolErrors.length === 0,
    shortLived.poolErrors.map((e) => `${e.code}: ${e.message}`));
  try {
    await poolFor(SHORT).query('select 1');
    check('a new pool for the expired token is refused', false, 'the query ran');
  } catch (e) {
    check('a new pool for the expired token is refused with SQLSTATE 28000', e.code === '28000', `${e.code}: ${e.message}`);
  }
});

const { version } = JSON.parse(readFileSync(new URL('./node_modules/pg/package.json', import.meta.url), 'utf8'));
console.log(`pg ${version}`);
if (failures.length > 0) {
  console.log(`${failures.length} check(s) failed: ${failures.join(', ')}`);
  process.exit(1);
}
console.log('all node-postgres checks passed');
