// What the Node.js programs share when the proxy pools per transaction.
//
// RLSGATE_POOL_MODE=transaction says the proxy lends a backend per
// transaction, RLSGATE_POOL_SIZE how many it has
// (tests/integration/clients.rs sets both).

export const TRANSACTION_MODE = process.env.RLSGATE_POOL_MODE === 'transaction';
export const POOL_SIZE = Number(process.env.RLSGATE_POOL_SIZE ?? 0);

// What transaction mode refuses: each, run on its own, fails with SQLSTATE
// 0A000 and leaves the connection usable.
export const REFUSED = [
  'listen rlsgate_checks',
  'select pg_advisory_lock(4242)',
  'select pg_try_advisory_lock_shared(4242)',
  'declare rlsgate_held cursor with hold for select 1',
  'create temp table rlsgate_scratch (x int)',
];

// Whether a refusal's message says that transaction pooling is why.
export function namesTransactionPooling(error) {
  return /transaction pool/i.test(error?.message ?? '');
}

// Connections of the program holding all of the proxy's backends but one in
// open transactions, handed round between two transactions of another
// connection (`turn`): the idle one takes the only free backend, the one
// that other connection just used, and the one that has held its backend
// longest lets go of it. So each transaction of that connection runs on a
// different backend from its last, one that served another client in
// between. Each holder is a function running one statement on its own
// connection.
export class Rotation {
  static async start(holders) {
    const rotation = new Rotation();
    rotation.idle = holders[0];
    rotation.busy = holders.slice(1);
    for (const holder of rotation.busy) await Rotation.hold(holder);
    return rotation;
  }

  static async hold(holder) {
    await holder('begin');
    await holder('select pg_backend_pid()');
  }

  async turn() {
    await Rotation.hold(this.idle);
    this.busy.push(this.idle);
    this.idle = this.busy.shift();
    await this.idle('commit');
  }
}

// The number of transactions in `pids` (the backend each ran on, in order)
// that ran on a different backend from the one before.
export function moves(pids) {
  return pids.slice(1).filter((pid, i) => pid !== pids[i]).length;
}
