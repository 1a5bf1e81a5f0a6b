"""Client sessions: each mount registers, heartbeats, and is cleaned up by anyone once its
heartbeats stop (its locks released, the unlinked files it held open deleted)."""

from __future__ import annotations

import asyncio
import json
import time

from cairn.meta import keys


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class SessionMixin:
    async def new_session(self, info: dict) -> int:
        sid = await self.r.incr(keys.NEXT_SESSION)
        now = time.time()
        record = {"started": now, **info}
        self._session_info = {k: _text(v) for k, v in record.items()}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.session(sid), mapping=self._session_info)
        pipe.zadd(keys.SESSIONS, {str(sid): now})
        await pipe.execute()
        self.sid = sid
        return sid

    async def heartbeat(self) -> None:
        """Marks this session alive. If others already cleaned it up as expired (a long
        pause), it registers again with its open files; its locks are gone."""
        sid = self.sid
        if sid is None:
            return
        if await self.r.zadd(keys.SESSIONS, {str(sid): time.time()}):
            self.stats.extra["session_revived"] = self.stats.extra.get("session_revived", 0) + 1
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(keys.session(sid), mapping=self._session_info)
            for ino in self._opens:
                pipe.sadd(keys.opened(ino), sid)
                pipe.sadd(keys.session_open(sid), ino)
            await pipe.execute()

    async def close_session(self) -> None:
        """Ends this client's session: its opens and locks go."""
        sid = self.sid
        if sid is None:
            return
        self._opens.clear()
        self._closing.clear()  # the cleanup below releases them
        if self._closer is not None:  # sleeping, or sending a batch: let it end
            await asyncio.gather(self._closer, return_exceptions=True)
        await self._cleanup_session(sid)
        self.sid = None

    async def clean_expired_sessions(self, timeout: float = 60) -> int:  # noqa: ASYNC109
        """Cleans the sessions whose last heartbeat is older than timeout seconds."""
        stale = await self.r.zrangebyscore(keys.SESSIONS, "-inf", time.time() - timeout)
        count = 0
        for raw in stale:
            sid = int(raw)
            if sid == self.sid:
                continue
            await self._cleanup_session(sid)
            count += 1
        return count

    async def _cleanup_session(self, sid: int) -> None:
        await self._release_locks(sid)
        for raw in await self.r.smembers(keys.session_open(sid)):
            await self._release_open(int(raw), sid)
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(keys.SESSIONS, str(sid))
        pipe.delete(keys.session(sid), keys.session_open(sid), keys.session_locks(sid))
        await pipe.execute()

    async def list_sessions(self) -> list[dict]:
        out = []
        for raw, beat in await self.r.zrange(keys.SESSIONS, 0, -1, withscores=True):
            sid = int(raw)
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(keys.session(sid))
            pipe.scard(keys.session_open(sid))
            pipe.scard(keys.session_locks(sid))
            info, opened, locked = await pipe.execute()
            record = {k.decode(): v.decode() for k, v in info.items()}
            record.update(sid=sid, heartbeat=beat, open_files=opened, lock_keys=locked)
            out.append(record)
        return out
