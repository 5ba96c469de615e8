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
// unless the server agrees to TLS and the handshake succeeds. Exits 0 only
// if every check passed; prints each check.
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import postgres from 'postgres';

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

await step('sessions end with their token', async () => {
  const wait = SHORT_ENDS_AT * 1000 + 1000 - Date.now();
  if (wait > 0) await sleep(wait);
  // The proxy ended the idle session; postgres.js connects again for the
  // next query, and the token is refused.
  try {
    await shortLived`select 1`;
    check('a query after the token expired fails', false, 'the query ran');
  } catch (e) {
    check('a query after the token expired fails with SQLSTATE 28000', e.code === '28000', `${e.code}: ${e.message}`);
    check('it says the token expired', /token expired/.test(e.message), e.message);
  } finally {
    await shortLived.end({ timeout: 5 });
  }
});

console.log(`ssl: ${JSON.stringify(ssl)}`);
const { version } = JSON.parse(readFileSync(new URL('./node_modules/postgres/package.json', import.meta.url), 'utf8'));
console.log(`postgres ${version}`);
if (failures.length > 0) {
  console.log(`${failures.length} check(s) failed: ${failures.join(', ')}`);
  process.exit(1);
}
console.log('all postgres.js checks passed');
