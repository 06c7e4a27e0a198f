"""Caps on open WebSockets per user and per tenant, counted across every instance.

Each cap is a Redis sorted set of connection ids scored by when they expire (as presence
does for rooms). Taking a seat is one Lua step: drop the expired members of both sets,
count, and add the connection to both only if neither is full, so two instances admitting
at once cannot both take the last seat. Every instance pushes the expiry of its own open
connections forward (the `SocketSeats` actor, every third of `NOTIFYD_WS_PRESENCE_TTL`), and a
closed socket leaves at once; an instance that crashed stops refreshing, and its sockets
stop counting once they expire, within one TTL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.realtime.history import now_ms
from notifyd.realtime.ports import Seat, SeatRefused
from notifyd.supervisor import sleep_or_stop

# KEYS[1] the user's set, KEYS[2] the tenant's; ARGV: now ms, expiry ms, connection id,
# user cap, tenant cap (0: no cap), key ttl ms. Returns 0 (taken), 1 (user full),
# 2 (tenant full).
TAKE = """
local caps = {tonumber(ARGV[4]), tonumber(ARGV[5])}
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if caps[i] > 0 and redis.call('ZCARD', KEYS[i]) >= caps[i] then return i end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ARGV[6])
end
return 0
"""

log = logging.getLogger("notifyd.realtime.seats")

REFRESH_CHUNK = 500  # connection ids per ZADD of a refresh


class SocketSeats:
    """This instance's seats; an actor that keeps them from expiring."""

    name = "socket-seats"

    def __init__(self, redis: Redis, keys: Keys, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = int(ttl * 1000)
        self._take = redis.register_script(TAKE)
        self._prefix = uuid.uuid4().hex[:16] + ":"  # this instance's, in every member name
        self._numbers = itertools.count(1)
        self._open: dict[int, Seat] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    async def take(
        self, tenant_id: str, user_id: str, per_user: int, per_tenant: int
    ) -> Seat | SeatRefused:
        """A seat for a new socket, or which cap is full. With both caps off: a seat that
        is counted nowhere (no Redis call)."""
        seat = Seat(next(self._numbers), tenant_id, user_id)
        if per_user <= 0 and per_tenant <= 0:
            return seat
        now = now_ms()
        # In a task of its own: an exception redis-py handles inside the call (NOSCRIPT on
        # the first call after a Redis restart) keeps its traceback's frames in a cycle,
        # and on Python 3.11 those frames link back to their callers, the socket handler
        # holding the socket among them: it would stay until the cycle collector ran.
        full = await asyncio.create_task(
            self._take(
                keys=[
                    self._keys.user_sockets(tenant_id, user_id),
                    self._keys.tenant_sockets(tenant_id),
                ],
                args=[
                    now,
                    now + self._ttl_ms,
                    self.member(seat),
                    per_user,
                    per_tenant,
                    2 * self._ttl_ms,
                ],
            )
        )
        if full == 1:
            return SeatRefused("sockets_user", f"this user has {per_user} sockets open already")
        if full == 2:
            return SeatRefused(
                "sockets_tenant", f"this tenant has {per_tenant} sockets open already"
            )
        self._open[seat.number] = seat
        return seat

    def member(self, seat: Seat) -> str:
        """The seat's name in the caps' sorted sets, unique across instances."""
        return f"{self._prefix}{seat.number}"

    def release_soon(self, seat: Seat) -> None:
        """Gives the seat back in a task of its own: the socket's handler returns at once.
        Awaiting Redis there, after the socket's own cleanup, kept the closed socket alive
        (a heartbeat armed meanwhile) until the cycle collector ran."""
        if seat.number not in self._open:
            return
        task = asyncio.get_running_loop().create_task(self.release(seat))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the seat expires by itself within the TTL, as a crashed instance's do
            log.warning("socket seat not released", extra={"error": repr(task.exception())})

    async def release(self, seat: Seat) -> None:
        if self._open.pop(seat.number, None) is None:
            return  # never counted
        member = self.member(seat)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._keys.user_sockets(seat.tenant_id, seat.user_id), member)
            pipe.zrem(self._keys.tenant_sockets(seat.tenant_id), member)
            await pipe.execute()

    async def refresh(self) -> None:
        """Pushes every local seat's expiry forward (`XX`: a seat whose socket was closed,
        or that expired meanwhile, is not brought back)."""
        expiry = now_ms() + self._ttl_ms
        by_key: dict[str, list[str]] = {}
        for seat in list(self._open.values()):
            member = self.member(seat)
            by_key.setdefault(self._keys.user_sockets(seat.tenant_id, seat.user_id), []).append(
                member
            )
            by_key.setdefault(self._keys.tenant_sockets(seat.tenant_id), []).append(member)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, members in by_key.items():
                for start in range(0, len(members), REFRESH_CHUNK):
                    chunk = members[start : start + REFRESH_CHUNK]
                    pipe.zadd(key, dict.fromkeys(chunk, expiry), xx=True)
                pipe.pexpire(key, 2 * self._ttl_ms)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            if await sleep_or_stop(stop, self._ttl_ms / 3000):
                return
