"""A client that writes a file and gets killed: run by tests/e2e/test_volume_tools.py.

    python _crash_writer.py META_URL NAME ROUND_BYTES FSYNCS

Opens a session on the volume as a mount does, creates /NAME and appends rounds of
ROUND_BYTES deterministic bytes (round r is random.Random(f"crash-{r}")). The first FSYNCS
rounds are each followed by an fsync (ChunkWriter flush: blocks stored, slices committed)
and reported on stdout as one JSON line:

    {"fsynced": {"round": r, "offset": o, "length": n, "sha256": "..."}}

Then it writes rounds without fsync, waits until their full blocks have landed in the
object store (uploaded, not committed: what gc must find), prints {"pending": bytes} and
keeps writing slowly until it is killed. Nothing is ever flushed after that line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys


def round_bytes(r: int, n: int) -> bytes:
    return random.Random(f"crash-{r}").randbytes(n)


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


async def main(url: str, name: str, size: int, fsyncs: int) -> None:
    from cairn.chunk.writer import ChunkWriter
    from cairn.meta.engine import ROOT_CTX, ROOT_INODE, Meta
    from cairn.storage import open_store

    meta = await Meta.open(url)
    await meta.new_session({"hostname": "crash-writer", "pid": os.getpid()})
    store = open_store(meta.fmt.storage)
    inode, _ = await meta.create(ROOT_CTX, ROOT_INODE, name.encode(), 0o644)
    writer = ChunkWriter(meta, store)
    handle = writer.open(inode)
    offset = 0
    r = 0
    for r in range(fsyncs):
        data = round_bytes(r, size)
        await handle.write(offset, data)
        await handle.flush()
        say(
            {
                "fsynced": {
                    "round": r,
                    "offset": offset,
                    "length": size,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            }
        )
        offset += size
    pending = 0
    for r in range(fsyncs, fsyncs + 2):
        await handle.write(offset, round_bytes(r, size))
        offset += size
        pending += size
    # Until the full blocks are in the store (their slices stay uncommitted); the writer
    # offers a counter, not an event, for that.
    while writer.uploading:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    say({"pending": pending, "inode": inode})
    while True:  # mid-write until SIGKILL
        r += 1
        await handle.write(offset, round_bytes(r, 4096))
        offset += 4096
        await asyncio.sleep(0.01)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
