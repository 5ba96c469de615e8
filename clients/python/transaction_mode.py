"""What the Python programs share when the proxy pools per transaction.

RLSGATE_POOL_MODE=transaction says the proxy lends a backend per
transaction, RLSGATE_POOL_SIZE how many it has (tests/integration/clients.rs
sets both).
"""

import os
from collections import deque

POOL_MODE = os.environ.get("RLSGATE_POOL_MODE", "none")
TRANSACTION_MODE = POOL_MODE == "transaction"
POOL_SIZE = int(os.environ.get("RLSGATE_POOL_SIZE", "0"))

# What transaction mode refuses: each, run on its own, fails with SQLSTATE
# 0A000 and leaves the connection usable.
REFUSED = [
    "listen rlsgate_checks",
    "select pg_advisory_lock(4242)",
    "select pg_try_advisory_lock_shared(4242)",
    "declare rlsgate_held cursor with hold for select 1",
    "create temp table rlsgate_scratch (x int)",
]


def names_transaction_pooling(error):
    """Whether a refusal's message says that transaction pooling is why."""
    return "transaction pool" in str(error).lower()


class Rotation:
    """Connections of the program holding all of the proxy's backends but one
    in open transactions, handed round between two transactions of another
    connection (`turn`): the idle one takes the only free backend, the one
    that other connection just used, and the one that has held its backend
    longest lets go of it. So each transaction of that connection runs on a
    different backend from its last, one that served another client in
    between."""

    def __init__(self, connect):
        self.holders = [connect() for _ in range(POOL_SIZE)]
        self.idle = self.holders[0]
        self.busy = deque(self.holders[1:])
        for holder in self.busy:
            self._hold(holder)

    @staticmethod
    def _hold(conn):
        conn.execute("begin")
        conn.execute("select pg_backend_pid()")

    def turn(self):
        self._hold(self.idle)
        self.busy.append(self.idle)
        self.idle = self.busy.popleft()
        self.idle.execute("commit")

    def close(self):
        for conn in self.holders:
            conn.close()


class AsyncRotation:
    """A Rotation of asyncio connections (asyncpg's): the same, awaited."""

    @classmethod
    async def start(cls, connect):
        rotation = cls()
        rotation.holders = [await connect() for _ in range(POOL_SIZE)]
        rotation.idle = rotation.holders[0]
        rotation.busy = deque(rotation.holders[1:])
        for holder in rotation.busy:
            await cls._hold(holder)
        return rotation

    @staticmethod
    async def _hold(conn):
        await conn.execute("begin")
        await conn.execute("select pg_backend_pid()")

    async def turn(self):
        await self._hold(self.idle)
        self.busy.append(self.idle)
        self.idle = self.busy.popleft()
        await self.idle.execute("commit")

    async def close(self):
        for conn in self.holders:
            await conn.close()
