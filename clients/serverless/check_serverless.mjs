// @neondatabase/serverless and Drizzle through rlsgate's serverless front door (HTTP POST /sql and the
// WebSocket tunnel), used as applications written for Neon use them, changed only where they point.
//
// The connection details come from the environment (tests/integration/serverless.rs sets them):
// RLSGATE_HTTP (host:port of rlsgate's [http] address), RLSGATE_DB, ALICE_TOKEN, BOB_TOKEN, EXPIRED_TOKEN.
// `node check_serverless.mjs [SCENARIO...]` runs the named scenarios, all of them without one. Each check is
// printed; the first that fails ends the program with exit status 1 and says what it saw.
import { readFileSync } from 'node:fs';
import { isDeepStrictEqual } from 'node:util';

import { neon, neonConfig, NeonDbError, Pool, types } from '@neondatabase/serverless';
import { DrizzleQueryError, TransactionRollbackError, eq, inArray, like, sql } from 'drizzle-orm';
import { drizzle } from 'drizzle-orm/neon-http';
import { drizzle as drizzleWs } from 'drizzle-orm/neon-serverless';
import { bigint, boolean, pgTable, text } from 'drizzle-orm/pg-core';
import ws from 'ws';

const [nodeMajor] = process.versions.node.split('.').map(Number);
if (nodeMajor < 19) {
  console.error(`@neondatabase/serverless needs Node.js 19 or later; this is ${process.versions.node}`);
  process.exit(1);
}

function env(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set (tests/integration/serverless.rs sets it)`);
    process.exit(1);
  }
  return value;
}

const RLSGATE = env('RLSGATE_HTTP');
const DB = env('RLSGATE_DB');
const ALICE = env('ALICE_TOKEN');
const BOB = env('BOB_TOKEN');
const EXPIRED = env('EXPIRED_TOKEN');

// docs:begin serverless-config
// Point the driver at rlsgate: POST /sql and the WebSocket tunnel on its [http] address.
neonConfig.fetchEndpoint = `http://${RLSGATE}/sql`;
neonConfig.wsProxy = () => `${RLSGATE}/v2`;
neonConfig.useSecureWebSocket = false; // ws:// here; true (wss://) with [listen] tls_cert
neonConfig.webSocketConstructor = ws; // Node.js before 22 has no WebSocket of its own
neonConfig.poolQueryViaFetch = false; // Pool queries go through the WebSocket

// The user name is a [[role]] of rlsgate, the path its database; the host is not used.
const DATABASE_AUTHENTICATED_URL = `postgresql://authenticated@${RLSGATE}/${DB}`;
// docs:end

// The sample application's table (src/dev/sample.sql); user_id defaults to auth.user_id().
const todos = pgTable('todos', {
  id: bigint('id', { mode: 'number' }).primaryKey().generatedAlwaysAsIdentity(),
  userId: text('user_id').notNull().default(sql`(auth.user_id())`),
  title: text('title').notNull(),
  done: boolean('done').notNull().default(false),
});

// drizzle-orm/neon-http replaces the driver's date parsers process-wide when it is set up; the
// driver's own are kept here for the scenario that checks what the driver alone returns.
const DATE_TYPES = [1082, 1114, 1184, 1186, 1115, 1182, 1185, 1187, 1231];
const driverDateParsers = new Map(DATE_TYPES.map((oid) => [oid, types.getTypeParser(oid)]));

class CheckFailed extends Error {}

function shown(detail) {
  if (detail === undefined) return '';
  if (detail instanceof Error) return `: ${detail.stack ?? detail}`;
  return `: ${typeof detail === 'string' ? detail : JSON.stringify(detail, (_, v) => (typeof v === 'bigint' ? `${v}n` : v))}`;
}

function check(name, ok, detail) {
  if (!ok) throw new CheckFailed(`FAIL ${name}${shown(detail)}`);
  console.log(`ok   ${name}`);
}

function same(name, actual, expected) {
  check(name, isDeepStrictEqual(actual, expected), { actual, expected });
}

// The error `promise` rejects with; its resolving is a failure.
async function failure(name, promise) {
  try {
    const value = await promise;
    throw new CheckFailed(`FAIL ${name}: it succeeded${shown(value)}`);
  } catch (e) {
    if (e instanceof CheckFailed) throw e;
    return e;
  }
}

// A NeonDbError (HTTP 400 with the error's fields) with SQLSTATE `code`.
function isNeonError(e, code) {
  return e instanceof NeonDbError && e.code === code;
}

// A unique mark for the titles of one run, so that runs against one database do not meet.
const RUN = `${process.pid}-${Date.now()}`;

// --- todos over HTTP -------------------------------------------------------------------------

// docs:begin serverless-fetch-with-drizzle
// One endpoint for all users: each request carries the signed-in user's token,
// and rlsgate binds its claims to that request alone.
async function fetchWithDrizzle(getToken, callback) {
  const db = drizzle(neon(DATABASE_AUTHENTICATED_URL, { authToken: getToken }));
  return callback(db);
}

// In a request handler, with the token of the user who sent it:
async function listTodos(getToken) {
  return fetchWithDrizzle(getToken, (db) => db.select().from(todos).orderBy(todos.id));
}
// docs:end

async function todosOverHttp() {
  const titles = [`serverless ${RUN}: alice 1`, `serverless ${RUN}: alice 2`];
  const inserted = await fetchWithDrizzle(async () => ALICE, (db) =>
    db.insert(todos).values(titles.map((title) => ({ title }))).returning());
  same('alice inserts two todos, user_id from her token', inserted.map((r) => [r.userId, r.title]),
    titles.map((t) => ['alice', t]));

  const alices = await listTodos(async () => ALICE);
  check('alice sees only her rows', alices.length >= 2 && alices.every((r) => r.userId === 'alice'), alices);
  const bobs = await listTodos(() => BOB);
  check('bob sees only his rows', bobs.length >= 1 && bobs.every((r) => r.userId === 'bob'), bobs);

  const touched = await fetchWithDrizzle(() => BOB, (db) =>
    db.update(todos).set({ done: true, title: 'taken by bob' }).where(eq(todos.userId, 'alice')).returning());
  same("bob's update of alice's rows touches none", touched, []);
  const after = await listTodos(() => ALICE);
  check("alice's rows are unchanged", after.filter((r) => titles.includes(r.title)).every((r) => !r.done), after);

  const planted = await failure("bob's insert for alice is refused", fetchWithDrizzle(() => BOB, (db) =>
    db.insert(todos).values({ userId: 'alice', title: `serverless ${RUN}: planted by bob` })));
  check('through Drizzle it is a DrizzleQueryError', planted instanceof DrizzleQueryError, planted);
  check('its cause is a NeonDbError with SQLSTATE 42501', isNeonError(planted.cause, '42501'), planted.cause);
  check('the message names row-level security', /row-level security/.test(planted.cause.message), planted.cause.message);

  const direct = await failure('the same insert with neon() alone is refused', neon(DATABASE_AUTHENTICATED_URL, { authToken: BOB })
    .query('insert into todos (user_id, title) values ($1, $2)', ['alice', `serverless ${RUN}: planted by bob`]));
  check('neon() alone gets NeonDbError 42501', isNeonError(direct, '42501'), direct);

  await withAuth(ALICE, BOB, titles);
}

// Drizzle's $withAuth: one database object, a token per query.
async function withAuth(aliceToken, bobToken, titles) {
  // docs:begin serverless-with-auth
  // One db for all users; each query carries the token of the user it is for.
  const db = drizzle(neon(DATABASE_AUTHENTICATED_URL));

  const mine = await db.$withAuth(aliceToken).select().from(todos).where(inArray(todos.title, titles));
  const theirs = await db.$withAuth(bobToken).select().from(todos).where(inArray(todos.title, titles));
  // docs:end
  same('$withAuth: alice finds her two todos', mine.map((r) => r.title).sort(), [...titles].sort());
  same('$withAuth: bob finds none of them', theirs, []);
  const who = await db.$withAuth(bobToken).execute(sql`select auth.user_id() as id`);
  same('$withAuth: bob is bob', who.rows, [{ id: 'bob' }]);
}

// --- refused tokens ----------------------------------------------------------------------------

// `token` with its payload's sub changed to mallory, the signature kept.
function tampered(token) {
  const [header, payload, signature] = token.split('.');
  const claims = JSON.parse(Buffer.from(payload, 'base64url'));
  claims.sub = 'mallory';
  return [header, Buffer.from(JSON.stringify(claims)).toString('base64url'), signature].join('.');
}

async function refusedTokens() {
  const cases = [
    ['an expired token', { authToken: EXPIRED }, /expired/],
    ['a tampered token', { authToken: tampered(ALICE) }, /signature/],
    ['a missing token', {}, /token/],
  ];
  for (const [what, options, says] of cases) {
    const e = await failure(`${what} is refused`, neon(DATABASE_AUTHENTICATED_URL, options)`select auth.user_id()`);
    check(`${what}: NeonDbError with SQLSTATE 28000`, isNeonError(e, '28000'), e);
    check(`${what}: the message says why`, says.test(e.message), e.message);
  }
  const viaDrizzle = await failure('an expired token through Drizzle is refused',
    fetchWithDrizzle(() => EXPIRED, (db) => db.select().from(todos)));
  check('through Drizzle: DrizzleQueryError whose cause has SQLSTATE 28000',
    viaDrizzle instanceof DrizzleQueryError && isNeonError(viaDrizzle.cause, '28000'), viaDrizzle);
  const fine = await neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE })`select auth.user_id() as id`;
  same('a good token still works', fine, [{ id: 'alice' }]);
}

// --- types -------------------------------------------------------------------------------------

const TYPES_SQL = `select $1::int4 as int4, $2::int8 as int8, $3::numeric as numeric, $4::bool as yes,
  $5::bool as no, $6::jsonb as jsonb, $7::bytea as bytea, $8::int4[] as int4s, $9::text[] as texts,
  $10::timestamptz as ts, $11::text as nothing`;
const TYPE_OIDS = [23, 20, 1700, 16, 16, 3802, 17, 1007, 1009, 1184, 25];
const JSON_VALUE = { a: [1, 'two', null, 3.5], nested: { t: true, f: false }, text: 'é ✓ "quoted" \\ back' };
const TEXTS = ['a', 'b,c', 'with "quotes"', 'back\\slash', '', null, '{braces}', 'NULL'];
const WHEN = new Date('2024-02-29T12:34:56.789Z');

// A row of TYPES_SQL as comparable values: Buffers as hex, Dates as ISO strings.
function comparable(row) {
  return row.map((v) => {
    if (v instanceof Uint8Array) return `bytes:${Buffer.from(v).toString('hex')}`;
    if (v instanceof Date) return `date:${v.toISOString()}`;
    return v;
  });
}

async function typesRoundTrip() {
  for (const [oid, parser] of driverDateParsers) types.setTypeParser(oid, parser);
  const q = neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE });
  const params = [-2147483648, 9007199254740993n, '-12345678901234567890.000000000123', true, false, JSON_VALUE,
    Buffer.from([0, 1, 0x7f, 0xfe, 0xff]), [1, -2, 2147483647], TEXTS, WHEN, null];
  const expected = [-2147483648, '9007199254740993', '-12345678901234567890.000000000123', true, false, JSON_VALUE,
    'bytes:00017ffeff', [1, -2, 2147483647], TEXTS, `date:${WHEN.toISOString()}`, null];

  const full = await q.query(TYPES_SQL, params, { fullResults: true, arrayMode: true });
  same('parameters come back as the driver parses them', comparable(full.rows[0]), expected);
  same('the fields name each column', full.fields.map((f) => f.name),
    ['int4', 'int8', 'numeric', 'yes', 'no', 'jsonb', 'bytea', 'int4s', 'texts', 'ts', 'nothing']);
  same("the fields' type oids", full.fields.map((f) => f.dataTypeID), TYPE_OIDS);
  same('command and rowCount', [full.command, full.rowCount, full.rowAsArray], ['SELECT', 1, true]);

  const objects = await q.query(TYPES_SQL, params);
  same('without arrayMode a row is an object', Object.keys(objects[0]),
    ['int4', 'int8', 'numeric', 'yes', 'no', 'jsonb', 'bytea', 'int4s', 'texts', 'ts', 'nothing']);
  same('and holds the same values', comparable(Object.values(objects[0])), expected);

  const fullObjects = await q.query('select $1::int4 as n', [7], { fullResults: true });
  same('fullResults without arrayMode', [fullObjects.rows, fullObjects.rowAsArray], [[{ n: 7 }], false]);

  const literals = await q.query(`select 2147483647::int4, (-9223372036854775808)::int8, 'NaN'::numeric,
    '{"k": [1, {"z": null}]}'::jsonb, '\\xdeadbeef'::bytea, array[1, null, 3]::int4[], '{}'::text[],
    '2024-02-29 12:34:56.789+00'::timestamptz, null::int4`, [], { arrayMode: true });
  same('results written by the database parse too', comparable(literals[0]), [2147483647, '-9223372036854775808', 'NaN',
    { k: [1, { z: null }] }, 'bytes:deadbeef', [1, null, 3], [], `date:${WHEN.toISOString()}`, null]);

  const none = await q.query('select 1 where false', [], { fullResults: true });
  same('no rows', [none.rows, none.rowCount, none.command], [[], 0, 'SELECT']);
  const created = await q.query('create temp table typed_scratch (n int)', [], { fullResults: true });
  same('a command without a row count', [created.command, created.rowCount, created.fields], ['CREATE', null, []]);
}

// --- batches -----------------------------------------------------------------------------------

async function batches() {
  const q = neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE });
  const title = (what) => `serverless ${RUN}: batch ${what}`;

  const failed = await failure('a batch that fails halfway fails', q.transaction((tx) => [
    tx`insert into todos (title) values (${title('1 rolled back')})`,
    tx`insert into todos (title) values (${title('2 rolled back')})`,
    tx`select 1 / 0`,
    tx`insert into todos (title) values (${title('3 rolled back')})`,
  ]));
  check('its error is the failing query\'s: 22012', isNeonError(failed, '22012'), failed);
  const left = await q`select title from todos where title like ${title('%rolled back')}`;
  same('it leaves nothing behind', left, []);

  same('a batch that succeeds returns each result', await insertAndCount(() => ALICE, title('kept')),
    [[{ user_id: 'alice' }], [{ n: 1 }]]);
  same('an empty batch', await q.transaction([]), []);
  await batchOptions(q);
  await drizzleBatch(title);
}

async function insertAndCount(getToken, title) {
  // docs:begin serverless-transaction
  const sql = neon(DATABASE_AUTHENTICATED_URL, { authToken: getToken });
  // One request, one transaction: every statement is kept, or none.
  const [inserted, counted] = await sql.transaction([
    sql`insert into todos (title) values (${title}) returning user_id`,
    sql`select count(*)::int as n from todos where title = ${title}`,
  ], { isolationLevel: 'RepeatableRead' });
  // docs:end
  return [inserted, counted];
}

const SETTINGS_SQL = `select current_setting('transaction_isolation') as isolation,
  current_setting('transaction_read_only') as read_only, current_setting('transaction_deferrable') as deferrable`;

// Isolation level, read-only and deferrable reach the transaction.
async function batchOptions(q) {
  const settings = async (options) => (await q.transaction((tx) => [tx.query(SETTINGS_SQL)], options))[0][0];
  same('default batch options', await settings(undefined),
    { isolation: 'read committed', read_only: 'off', deferrable: 'off' });
  same('isolationLevel RepeatableRead', await settings({ isolationLevel: 'RepeatableRead' }),
    { isolation: 'repeatable read', read_only: 'off', deferrable: 'off' });
  same('Serializable, read-only, deferrable',
    await settings({ isolationLevel: 'Serializable', readOnly: true, deferrable: true }),
    { isolation: 'serializable', read_only: 'on', deferrable: 'on' });
  same('ReadUncommitted', (await settings({ isolationLevel: 'ReadUncommitted' })).isolation, 'read uncommitted');

  const refused = await failure('a write in a read-only batch fails', q.transaction((tx) => [
    tx`insert into todos (title) values (${`serverless ${RUN}: read-only rolled back`})`,
  ], { readOnly: true }));
  check('with SQLSTATE 25006', isNeonError(refused, '25006'), refused);
  same('and the next request is read-write again', (await settings(undefined)).read_only, 'off');
}

// Drizzle's db.batch is the driver's transaction.
async function drizzleBatch(title) {
  const db = drizzle(neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE }));
  const failed = await failure('a Drizzle batch that fails halfway fails', db.batch([
    db.insert(todos).values({ title: title('drizzle rolled back') }),
    db.insert(todos).values({ userId: 'bob', title: title('drizzle for bob rolled back') }),
  ]));
  check('with the refusal of the policy (42501)', isNeonError(failed, '42501') || isNeonError(failed.cause, '42501'), failed);
  const [, found] = await db.batch([
    db.insert(todos).values({ title: title('drizzle kept') }),
    db.select({ title: todos.title }).from(todos).where(like(todos.title, title('drizzle%'))),
  ]);
  same('a Drizzle batch keeps what succeeded, not what failed', found, [{ title: title('drizzle kept') }]);
}

// --- many concurrent requests ------------------------------------------------------------------

async function concurrentRequests() {
  const q = neon(DATABASE_AUTHENTICATED_URL);
  const users = [['alice', ALICE], ['bob', BOB]];
  const total = 200;
  const width = 32;
  const seen = new Array(total);
  let next = 0;
  const worker = async () => {
    while (next < total) {
      const i = next++;
      const [, token] = users[i % 2];
      const rows = await q.query('select auth.user_id() as id, $1::int as i, pg_backend_pid() as pid',
        [i], { authToken: token });
      seen[i] = rows[0];
    }
  };
  await Promise.all(Array.from({ length: width }, worker));
  const wrong = seen.filter((row, i) => row.i !== i || row.id !== users[i % 2][0]);
  same(`${total} requests, ${width} at a time: each saw its own identity`, wrong, []);
  const backends = new Set(seen.map((r) => r.pid)).size;
  console.log(`     (${backends} upstream backends served them)`);
  const both = seen.filter((r) => r.id === 'alice').map((r) => r.pid).filter((pid) =>
    seen.some((r) => r.id === 'bob' && r.pid === pid));
  check('alice and bob took turns on shared backends', both.length > 0, { backends });
}

// --- session state does not outlive a request --------------------------------------------------

const PROBE_SQL = `select pg_backend_pid() as pid, current_setting('search_path') as search_path,
  current_setting('application_name') as application_name,
  to_regclass('pg_temp.leak_probe') is not null as temp_table,
  exists (select from pg_prepared_statements where name = 'leak_probe') as prepared,
  coalesce(current_setting('app.leak_probe', true), '') as custom`;

async function sessionState() {
  const q = neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE });
  const clean = (await q.query(PROBE_SQL))[0];
  check('a fresh request has no leftovers', !clean.temp_table && !clean.prepared && !clean.custom, clean);
  // Backends a setting was made on, and probes that ran on one of them: without
  // such a probe, a clean answer would show nothing.
  const dirtied = new Set();
  let reused = 0;
  const setters = [
    "set search_path = 'leak_probe'",
    "set application_name = 'leak_probe'",
    'create temp table leak_probe (n int)',
    'prepare leak_probe as select 1',
    "select pg_backend_pid() as pid, set_config('app.leak_probe', 'left', false)",
  ];
  for (let round = 0; round < 4; round++) {
    for (const setter of setters) {
      const rows = await q.query(setter);
      if (rows[0]?.pid) dirtied.add(rows[0].pid);
      const probe = (await q.query(PROBE_SQL))[0];
      same(`after "${setter}" (round ${round + 1}) the next request starts clean`,
        { ...probe, pid: 0 }, { ...clean, pid: 0 });
      if (dirtied.has(probe.pid)) reused += 1;
    }
  }
  check(`some requests ran on a backend a setting was made on (${reused} of 20)`, reused > 0, { dirtied: [...dirtied] });
}

// --- WebSocket ---------------------------------------------------------------------------------

// docs:begin serverless-websocket-pool
// One pool per user token: over the WebSocket a connection is one user's session.
function poolFor(token) {
  const pool = new Pool({
    connectionString: `postgresql://authenticated:${token}@${RLSGATE}/${DB}`,
    max: 4,
  });
  pool.on('error', (err) => console.warn('session ended:', err.message));
  return pool;
}

async function markDone(token, id) {
  const pool = poolFor(token);
  try {
    const db = drizzleWs({ client: pool });
    return await db.transaction(async (tx) => {
      const [row] = await tx.update(todos).set({ done: true }).where(eq(todos.id, id)).returning();
      if (!row) tx.rollback(); // not this user's todo
      return row;
    });
  } finally {
    await pool.end();
  }
}
// docs:end

async function webSocket() {
  same('pipelineConnect is the default, "password"', neonConfig.pipelineConnect, 'password');
  const pool = poolFor(ALICE);
  try {
    const { rows } = await pool.query('select auth.user_id() as id, $1::int + 1 as n', [41]);
    same('a Pool query runs as alice', rows, [{ id: 'alice', n: 42 }]);
    const db = drizzleWs({ client: pool });
    const title = `serverless ${RUN}: over the WebSocket`;
    const [mine] = await db.insert(todos).values({ title }).returning();
    same('alice inserts over the WebSocket', [mine.userId, mine.title], ['alice', title]);
    const owners = await db.selectDistinct({ userId: todos.userId }).from(todos);
    same('she sees only her rows', owners, [{ userId: 'alice' }]);
    await interactiveTransactions(db, mine);
    const planted = await failure("an insert for bob is refused", pool.query(
      'insert into todos (user_id, title) values ($1, $2)', ['bob', `serverless ${RUN}: planted`]));
    same('with SQLSTATE 42501', planted.code, '42501');
  } finally {
    await pool.end();
  }
  await webSocketOthers();
}

async function interactiveTransactions(db, mine) {
  const committed = `serverless ${RUN}: committed over the WebSocket`;
  const inside = await db.transaction(async (tx) => {
    await tx.insert(todos).values({ title: committed });
    return tx.select().from(todos).where(eq(todos.title, committed));
  });
  same('a transaction sees its own insert', inside.length, 1);
  const rolledBack = `serverless ${RUN}: rolled back over the WebSocket`;
  const rollback = await failure('a transaction that calls rollback() ends', db.transaction(async (tx) => {
    await tx.insert(todos).values({ title: rolledBack });
    tx.rollback();
  }));
  check('with TransactionRollbackError', rollback instanceof TransactionRollbackError, rollback);
  const kept = await db.select({ title: todos.title }).from(todos)
    .where(inArray(todos.title, [committed, rolledBack]));
  same('the committed insert stays, the rolled back one does not', kept, [{ title: committed }]);
  const done = await markDone(ALICE, mine.id);
  same('markDone commits for the owner', [done?.id, done?.done], [mine.id, true]);
  const stolen = await failure("bob's markDone of alice's todo rolls back", markDone(BOB, mine.id));
  check('with TransactionRollbackError', stolen instanceof TransactionRollbackError, stolen);
}

// Bob's own pool, and an expired token refused.
async function webSocketOthers() {
  const bob = poolFor(BOB);
  try {
    const { rows } = await bob.query('select distinct user_id from todos');
    same('bob, over his own WebSocket pool, sees only his rows', rows, [{ user_id: 'bob' }]);
  } finally {
    await bob.end();
  }
  const expired = poolFor(EXPIRED);
  try {
    const e = await failure('an expired token is refused over the WebSocket', expired.query('select 1'));
    same('with SQLSTATE 28000', e.code, '28000');
    check('saying the token expired', /expired/.test(e.message), e.message);
  } finally {
    await expired.end();
  }
}

// --- a slow request, for the test that reads pg_stat_activity while it runs ----------------------

async function slowRequests() {
  const seconds = Number(process.env.SLEEP_SECONDS ?? '2');
  const query = `select current_setting('rlsgate.session') as envelope, auth.user_id() as id from pg_sleep(${seconds})`;
  const pool = poolFor(ALICE);
  try {
    const [http, socket] = await Promise.all([
      neon(DATABASE_AUTHENTICATED_URL, { authToken: ALICE }).query(query),
      pool.query(query).then((r) => r.rows),
    ]);
    same('both slow requests ran as alice', [http[0].id, socket[0].id], ['alice', 'alice']);
    console.log(`envelope http ${http[0].envelope}`);
    console.log(`envelope websocket ${socket[0].envelope}`);
  } finally {
    await pool.end();
  }
}

// --- main --------------------------------------------------------------------------------------

const SCENARIOS = {
  types: typesRoundTrip,
  todos: todosOverHttp,
  'refused-tokens': refusedTokens,
  batches,
  concurrent: concurrentRequests,
  'session-state': sessionState,
  websocket: webSocket,
  slow: slowRequests,
};

const wanted = process.argv.slice(2);
const unknown = wanted.filter((name) => !(name in SCENARIOS));
if (unknown.length > 0) {
  console.error(`unknown scenario(s) ${unknown.join(', ')}; known: ${Object.keys(SCENARIOS).join(', ')}`);
  process.exit(2);
}
const versions = ['@neondatabase/serverless', 'drizzle-orm', 'ws'].map((name) => {
  const { version } = JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8'));
  return `${name} ${version}`;
});
console.log(`${versions.join(', ')}, node ${process.versions.node}`);
for (const name of wanted.length > 0 ? wanted : Object.keys(SCENARIOS)) {
  console.log(`-- ${name}`);
  try {
    await SCENARIOS[name]();
  } catch (e) {
    console.log(e instanceof CheckFailed ? e.message : `FAIL ${name}: unexpected error${shown(e)}`);
    if (e?.cause) console.log(`     cause${shown(e.cause)}`);
    process.exit(1);
  }
}
console.log('all serverless checks passed');
