// postgres.js (`postgres`) through rlsgate, used as its users use it: tagged
// template queries, prepared statements by default, sql.begin transactions,
// and a pool of connections behind one `sql`.
//
// The connection details come from the environment (tests/integration/clients.rs sets
// them): RLSGATE_HOST, RLSGATE_PORT, RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN,
// EXPIRED_TOKEN, and SHORT_TOKEN, alice's token whose sessions the proxy
// ends at SHORT_TOKEN_ENDS_AT (unix seconds). With RLSGATE_SSLMODE=require
// (the proxy has a certificate), every connection is made with
// `ssl: 'require'`: encrypted, the certificate not checked. postgres.js does
// not show whether a connection is encrypted, but with 'require' it fails
// unless the server agrees to TLS and the handshake succeeds. With
// RLSGATE_POOL_MODE=transaction (the proxy lends its RLSGATE_POOL_SIZE
// backends per transaction), the same checks, and those of transaction
// mode: what it refuses, and a connection's settings and prepared
// statements following it from backend to backend. Exits 0 only if every
// check passed; prints each check.
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import postgres from 'postgres';

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
const ssl = process.env.RLSGATE_SSLMODE || false;

const failures = [];

function check(name, ok, detail) {
  const shown = detail === undefined ? '' : `: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${shown}`);
  if (!ok) failures.push(name);
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

function sqlWithUrl(jwt) {
  // docs:begin postgres-js-url
  const sql = postgres(`postgresql://authenticated:${jwt}@${host}:${port}/${db}`, {
    max: 10, // a pool of up to 10 connections, all with this token
    connect_timeout: 10,
    ssl, // false or 'require' here; off loopback 'verify-full' (see TLS)
  });
  // docs:end
  return sql;
}

function sqlWithParameters(jwt) {
  // docs:begin postgres-js-parameters
  const sql = postgres({
    host,
    port,
    database: db,
    username: 'authenticated',
    password: jwt, // the user's token
    max: 10,
    connect_timeout: 10,
    ssl, // false or 'require' here; off loopback 'verify-full' (see TLS)
  });
  // docs:end
  return sql;
}

// A session of the short-lived token starts first, so that it is idle when
// the token runs out; the last step looks at it.
const shortLived = sqlWithParameters(SHORT);
await step('a session with a short-lived token starts', async () => {
  const [row] = await shortLived`select auth.user_id() as user_id`;
  check('a short-lived token connects', row.user_id === 'alice', row.user_id);
});

await step('connects both ways', async () => {
  for (const [form, make] of [['connection string', sqlWithUrl], ['parameters', sqlWithParameters]]) {
    const sql = make(ALICE);
    try {
      const [row] = await sql`select auth.user_id() as user_id`;
      check(`${form}: auth.user_id() is alice`, row.user_id === 'alice', row.user_id);
    } finally {
      await sql.end({ timeout: 5 });
    }
  }
});

await step('queries and transactions', async () => {
  // One connection, so that the prepared statements are all on one session.
  const sql = postgres(`postgresql://authenticated:${ALICE}@${host}:${port}/${db}`, { max: 1, connect_timeout: 10, ssl });
  try {
    const title = 'postgres.js: parameterized';
    const [inserted] = await sql`insert into todos (title) values (${title}) returning user_id, title`;
    check('parameterized insert fills user_id from the token', inserted.user_id === 'alice', inserted);
    const selected = await sql`select title from todos where title = ${title}`;
    check('parameterized select finds the row', selected.count === 1, selected.count);

    // postgres.js prepares each query once per connection and reuses it.
    for (let i = 0; i < 3; i++) {
      await sql`insert into todos ${sql({ title: `postgres.js: prepared ${i}` })}`;
    }
    const statements = await sql`
      select statement from pg_prepared_statements where statement like ${'insert into todos%'}`;
    check('each insert is prepared once (the first and the reused one)', statements.count === 2,
      statements.map((r) => r.statement));
    const [reused] = await sql`select count(*)::int as n from todos where title like ${'postgres.js: prepared %'}`;
    check('the prepared insert ran three times', reused.n === 3, reused.n);

    await sql.begin(async (tx) => {
      await tx`insert into todos (title) values (${'postgres.js: committed'})`;
    });
    try {
      await sql.begin(async (tx) => {
        await tx`insert into todos (title) values (${'postgres.js: rolled back'})`;
        throw new Error('roll back');
      });
    } catch (e) {
      if (e.message !== 'roll back') throw e;
    }
    const kept = await sql`
      select title from todos where title in ${sql(['postgres.js: committed', 'postgres.js: rolled back'])} order by title`;
    const titles = kept.map((r) => r.title);
    check('the committed transaction stays, the rolled back one does not',
      JSON.stringify(titles) === JSON.stringify(['postgres.js: committed']), titles);
  } finally {
    await sql.end({ timeout: 5 });
  }
});

await step('sees only own rows', async () => {
  const sql = sqlWithParameters(ALICE);
  try {
    const owners = (await sql`select distinct user_id from todos`).map((r) => r.user_id);
    check('alice sees only her own rows', JSON.stringify(owners) === '["alice"]', owners);
    try {
      await sql`insert into todos (user_id, title) values (${'bob'}, ${'postgres.js: planted'})`;
      check('an insert for bob is refused', false, 'it succeeded');
    } catch (e) {
      check('an insert for bob is refused with SQLSTATE 42501', e.code === '42501', e.code);
      check('the refusal names row-level security', /row-level security/.test(e.message), e.message);
    }
    const [again] = await sql`select auth.user_id() as user_id`;
    check('the connection goes on after the refusal', again.user_id === 'alice', again.user_id);
  } finally {
    await sql.end({ timeout: 5 });
  }
  const bob = sqlWithUrl(BOB);
  try {
    const owners = (await bob`select distinct user_id from todos`).map((r) => r.user_id);
    check('bob sees only his own rows', JSON.stringify(owners) === '["bob"]', owners);
  } finally {
    await bob.end({ timeout: 5 });
  }
});

await step('expired token is refused', async () => {
  const sql = sqlWithParameters(EXPIRED);
  try {
    await sql`select 1`;
    check('an expired token is refused', false, 'it connected');
  } catch (e) {
    check('the refusal has SQLSTATE 28000', e.code === '28000', e.code);
    check('the refusal is FATAL', e.severity === 'FATAL', e.severity);
    check('the refusal says the token expired', /token expired/.test(e.message), e.message);
  } finally {
    await sql.end({ timeout: 5 });
  }
});

await step('pool serves concurrent queries', async () => {
  const sql = sqlWithUrl(ALICE);
  try {
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        sql`select auth.user_id() as user_id, pg_backend_pid() as pid, ${i}::int as i from pg_sleep(0.05)`,
      ),
    );
    const rows = results.map((r) => r[0]);
    check('20 concurrent queries all ran',
      JSON.stringify(rows.map((r) => r.i).sort((a, b) => a - b)) === JSON.stringify([...Array(20).keys()]));
    check('every query ran as alice', rows.every((r) => r.user_id === 'alice'), [...new Set(rows.map((r) => r.user_id))]);
    const sessions = new Set(rows.map((r) => r.pid)).size;
    check('the pool used several sessions', sessions > 1, sessions);
  } finally {
    await sql.end({ timeout: 5 });
  }
});

// One connection of alice's.
function oneConnection() {
  return postgres(`postgresql://authenticated:${ALICE}@${host}:${port}/${db}`, { max: 1, connect_timeout: 10, ssl });
}

await transactionModeStep('transaction mode refuses what it cannot keep', async () => {
  const sql = oneConnection();
  try {
    // Each as postgres.js sends a query: a prepared statement of its own.
    const refused = [...REFUSED.map((text) => [text, () => sql.unsafe(text, [], { prepare: true })]),
      ['a tagged lock', () => sql`select pg_advisory_lock(${4242})`],
      ['a tagged lock again', () => sql`select pg_advisory_lock(${4242})`]];
    for (const [what, query] of refused) {
      try {
        await query();
        check(`${what}: refused`, false, 'it ran');
      } catch (e) {
        check(`${what}: refused with 0A000 naming transaction pooling`,
          e.code === '0A000' && namesTransactionPooling(e), `${e.code}: ${e.message}`);
      }
      const [row] = await sql`select auth.user_id() as user_id`;
      check(`${what}: the connection goes on`, row.user_id === 'alice', row.user_id);
    }
    const count = await sql.begin(async (tx) => {
      await tx`create temp table postgres_js_scratch (x int) on commit drop`;
      await tx`insert into postgres_js_scratch values (${1}), (${2})`;
      await tx`select pg_advisory_xact_lock(${4242})`;
      const [row] = await tx`select count(*)::int as n from postgres_js_scratch`;
      return row.n;
    });
    check('a temporary table ON COMMIT DROP and an xact lock work in a transaction', count === 2, count);
    await sql`notify rlsgate_checks, 'from postgres.js'`;
  } finally {
    await sql.end({ timeout: 5 });
  }
});

await transactionModeStep('settings and prepared statements follow the connection', async () => {
  const sql = oneConnection();
  const holders = Array.from({ length: POOL_SIZE }, oneConnection);
  try {
    const rotation = await Rotation.start(holders.map((h) => (text) => h.unsafe(text)));
    await sql`set application_name = 'postgres.js in transaction mode'`;
    await sql`set search_path = public, auth`;
    const round = (q, i) => q`
      select pg_backend_pid() as pid, auth.user_id() as user_id, current_setting('application_name') as app,
             current_setting('search_path') as path, ${i}::int as i`;
    const rows = [];
    for (let i = 0; i < 12; i++) {
      rows.push((await round(sql, i))[0]);
      await rotation.turn();
    }
    // Run again in one transaction, it is prepared on that transaction's backend.
    const here = await sql.begin(async (tx) => {
      await round(tx, 12);
      return tx`select name from pg_prepared_statements where statement like ${'%current_setting(\'search_path\') as path%'}`;
    });
    const got = rows.map(({ user_id, app, path, i }) => [user_id, app, path, i]);
    const want = rows.map((_, i) => ['alice', 'postgres.js in transaction mode', 'public, auth', i]);
    const same = JSON.stringify(got) === JSON.stringify(want);
    check("every transaction saw alice and the connection's settings", same, same ? `${got.length} transactions` : got);
    const pids = rows.map((r) => r.pid);
    check('each transaction ran on a different backend from the last', moves(pids) === pids.length - 1, pids);
    check('the query is prepared on the backend running it', here.count === 1, here.map((r) => r.name));
  } finally {
    await Promise.all([sql, ...holders].map((s) => s.end({ timeout: 5 })));
  }
});

await step('sessions end with their token', async () => {
  const wait = SHORT_ENDS_AT * 1000 + 1000 - Date.now();
  if (wait > 0) await sleep(wait);
  // The proxy ended the idle session; postgres.js connects again for the
  // next query, and the token is refused. On a busy machine postgres.js may
  // not have seen the close yet and write the query on the closed socket:
  // that query fails with CONNECTION_CLOSED, and the next one connects anew.
  const attempt = async () => {
    try {
      await shortLived`select 1`;
      return null;
    } catch (e) {
      return e;
    }
  };
  let e = await attempt();
  if (e && e.code === 'CONNECTION_CLOSED') e = await attempt();
  if (!e) {
    check('a query after the token expired fails', false, 'the query ran');
  } else {
    check('a query after the token expired fails with SQLSTATE 28000', e.code === '28000', `${e.code}: ${e.message}`);
    check('it says the token expired', /token expired/.test(e.message), e.message);
  }
  await shortLived.end({ timeout: 5 });
});

console.log(`ssl: ${JSON.stringify(ssl)}`);
const { version } = JSON.parse(readFileSync(new URL('./node_modules/postgres/package.json', import.meta.url), 'utf8'));
console.log(`postgres ${version}`);
if (failures.length > 0) {
  console.log(`${failures.length} check(s) failed: ${failures.join(', ')}`);
  process.exit(1);
}
console.log('all postgres.js checks passed');
