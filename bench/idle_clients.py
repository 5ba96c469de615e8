#!/usr/bin/env python3
"""Opens N idle client connections to a Postgres wire-protocol server and holds them.

Used by bench/run to measure the proxy's memory per connected client. Only the
standard library: each connection sends a startup message, answers a cleartext
password request (what rlsgate asks for) and waits for ReadyForQuery. Once all
are open it prints "open N" and holds them until it is terminated.

    idle_clients.py HOST PORT USER DATABASE COUNT   (password in PGPASSWORD)
"""

import asyncio
import os
import struct
import sys

# At most this many logins in flight at once, so that none waits long enough
# to hit the proxy's startup timeout.
CONCURRENT_LOGINS = 32


async def open_one(host, port, user, database, password, gate):
    async with gate:
        reader, writer = await asyncio.open_connection(host, port)
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", database))
        ) + b"\0"
        writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
        await writer.drain()
        while True:
            header = await reader.readexactly(5)
            kind = header[:1]
            (length,) = struct.unpack("!i", header[1:])
            body = await reader.readexactly(length - 4)
            if kind == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 3:
                    secret = password.encode() + b"\0"
                    writer.write(b"p" + struct.pack("!i", 4 + len(secret)) + secret)
                    await writer.drain()
                elif code != 0:
                    raise RuntimeError(f"unsupported authentication request {code}")
            elif kind == b"E":
                fields = [f[1:].decode(errors="replace") for f in body.split(b"\0") if f[:1] == b"M"]
                raise RuntimeError("refused: " + "; ".join(fields))
            elif kind == b"Z":
                return writer


async def main():
    host, port, user, database, count = sys.argv[1:6]
    password = os.environ.get("PGPASSWORD", "")
    gate = asyncio.Semaphore(CONCURRENT_LOGINS)
    results = await asyncio.gather(
        *(open_one(host, int(port), user, database, password, gate) for _ in range(int(count))),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"failed {len(failed)} of {count}: {failed[0]!r}", flush=True)
        sys.exit(1)
    print(f"open {count}", flush=True)
    await asyncio.Event().wait()  # hold them until terminated


if __name__ == "__main__":
    asyncio.run(main())
