"""Send rates and daily quotas, shared by every instance through Redis.

Rates are GCRA (the generic cell rate algorithm, as redis-cell and go-redis's `redis_rate`
do it): a bucket is one Redis string, its theoretical arrival time, and one Lua script moves
it using Redis's own clock, so every instance sees the same bucket and the same time. A
limit of `rate` sends a second with a `burst` lets `burst` sends through at once, then one
every `1/rate` seconds.

Three buckets can apply to a send: the caller's (tenant + role + user), chosen by role
(`user`, or `service`/`admin`), and the tenant's (every caller together). A bucket whose
rate is 0 is off and costs nothing. A slow bucket (a user's few sends a second) is asked for
one token per send: one script call, and a user is rate limited anyway. A fast one (the
tenant's, a service limit an operator set) would otherwise put a Redis round trip on the
hot path of every send: this instance *leases* tokens from it, a twentieth of a second's
worth at a time (at most an eighth of the burst), and spends them locally; a lease unused
after a second is dropped (it was charged when taken, so dropping it only errs on the strict
side). One refill per bucket is in flight at a time; the other sends wait for it.

Daily quotas (email through the global relay, SMS through the platform's Twilio account)
are a counter per tenant, channel and UTC day, leased the same way (a two-hundredth of the
quota at a time, at most 50): with a quota of a few, every send asks Redis.

A refusal is remembered locally until the bucket can answer yes again (at most a few
seconds for a quota, so an operator's raised quota applies soon), so a caller hammering
past its limit costs no Redis call at all. When Redis cannot be reached the send is let
through (and logged): the limits protect the platform from a tenant, and refusing every
send because Redis hiccuped would be the outage they are meant to prevent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd.auth.identity import Identity
from notifyd.keys import Keys
from notifyd.limits import Limits, Refusal

log = logging.getLogger("notifyd.ratelimit")

# Takes up to ARGV[1] tokens from the GCRA bucket KEYS[1]: ARGV[2] = ms between two sends
# (1000 / rate), ARGV[3] = burst. All or nothing below one token: returns {granted, ms to
# wait for one token (a string: Lua numbers become integers on the way out)}.
GCRA_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local want = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local free = math.floor((burst * interval - (tat - now)) / interval + 1e-9)
if free < 1 then
  return {0, string.format('%.3f', tat - now - (burst - 1) * interval)}
end
local granted = math.min(want, free)
local new = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
return {granted, '0'}
"""

# Takes up to ARGV[2] units of the daily quota ARGV[1] from the counter KEYS[1], which
# expires ARGV[3] seconds on (the day's end, plus a margin). Returns the units granted.
QUOTA_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local free = tonumber(ARGV[1]) - used
if free < 1 then return 0 end
local granted = math.min(free, tonumber(ARGV[2]))
redis.call('INCRBY', KEYS[1], granted)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return granted
"""

LEASE_SECONDS = 0.05  # a lease of a fast bucket covers this much of its rate
LEASE_MAX_BURST_SHARE = 8  # ...and at most this share of its burst
LEASE_TTL = 1.0  # seconds a leased token may wait to be spent
QUOTA_LEASE_SHARE = 200  # a quota lease is at most this share of the daily quota
QUOTA_LEASE_MAX = 50
QUOTA_REFUSAL_MEMORY = 5.0  # seconds a quota refusal is answered locally
MAX_LOCAL_ENTRIES = 10_000  # leases and refusals remembered, before expired ones are dropped


@dataclass(slots=True)
class _Lease:
    tokens: int
    expires: float  # monotonic


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One thing to take a token from: its Redis key, how it is asked, and what it is."""

    key: str
    limit: str
    lease: int  # tokens asked for at a time; 1: no lease, one call per send
    lease_ttl: float
    fetch: Callable[[int], Awaitable[tuple[int, float]]]  # want → (granted, seconds to wait)
    detail: str
    refusal_memory: float | None  # cap on how long a refusal is answered locally


def lease_size(rate: float, burst: int) -> int:
    """Tokens a fast bucket is leased in: 1 (no lease) for the slow ones."""
    return max(1, min(int(rate * LEASE_SECONDS), burst // LEASE_MAX_BURST_SHARE))


def utc_day(now: datetime) -> str:
    return now.strftime("%Y%m%d")


def seconds_to_midnight(now: datetime) -> float:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class Limiter:
    """This instance's view of the shared buckets: its leases and remembered refusals."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._wall = wall
        self._gcra = redis.register_script(GCRA_TAKE)
        self._quota = redis.register_script(QUOTA_TAKE)
        self._leases: dict[str, _Lease] = {}
        # key → (answered locally until, the retry time, the refusal); all monotonic
        self._refused: dict[str, tuple[float, float, Refusal]] = {}
        self._refills: dict[str, asyncio.Task[None]] = {}

    async def check_send(self, caller: Identity, limits: Limits) -> Refusal | None:
        """One send by `caller`: None when every rate that applies allows it (and the
        tokens are taken), else the refusal. Costs nothing when no rate applies."""
        if caller.role == "user":
            rate, burst, who = limits.rate_user, limits.rate_user_burst, "user"
        else:
            rate, burst, who = limits.rate_service, limits.rate_service_burst, caller.role
        # (the buckets are described only when Redis must be asked: not per send)
        taken = None
        if rate > 0:
            taken = self._keys.caller_rate(caller.tenant_id, caller.role, caller.user_id)
            refusal = await self._take(
                taken, functools.partial(self._rate_bucket, taken, "caller", rate, burst, who)
            )
            if refusal is not None:
                return refusal
        if limits.rate_tenant > 0:
            key = self._keys.tenant_rate(caller.tenant_id)
            refusal = await self._take(
                key,
                functools.partial(
                    self._rate_bucket,
                    key,
                    "tenant",
                    limits.rate_tenant,
                    limits.rate_tenant_burst,
                    None,
                ),
            )
            if refusal is not None:
                if taken is not None:
                    self._give_back(taken)
                return refusal
        return None

    async def check_unsubscribe(self, who: str, rate: float, burst: int) -> Refusal | None:
        """One request to the public /unsubscribe/ route by `who` (a client address, or
        `*` for every client together): None when allowed. A rate of 0 is off."""
        if rate <= 0:
            return None
        key = self._keys.unsubscribe_rate(who)

        def bucket() -> _Bucket:
            interval = 1000.0 / rate

            async def fetch(want: int) -> tuple[int, float]:
                granted, wait_ms = await self._gcra(keys=[key], args=[want, interval, burst])
                return int(granted), float(wait_ms) / 1000

            scope = "all clients together" if who == "*" else "per client address"
            detail = f"unsubscribe: {rate:g} requests a second, {burst} at once, {scope}"
            return _Bucket(key, "unsubscribe", 1, LEASE_TTL, fetch, detail, None)

        return await self._take(key, bucket)

    async def check_quota(self, channel: str, tenant_id: str, quota: int) -> Refusal | None:
        """One `channel` send of `tenant_id` through the platform's own relay or account,
        against its daily `quota` (0: none)."""
        if quota <= 0:
            return None
        now = self._wall()
        key = self._keys.daily_quota(channel, tenant_id, utc_day(now))

        def bucket() -> _Bucket:
            """How to ask Redis: made only when the lease is used up (not per send)."""
            left = seconds_to_midnight(now)
            what = (
                "emails through the platform's relay"
                if channel == "email"
                else ("SMS through the platform's Twilio account")
            )

            async def fetch(want: int) -> tuple[int, float]:
                ttl = math.ceil(left) + 3600
                granted = int(await self._quota(keys=[key], args=[quota, want, ttl]))
                return granted, (0.0 if granted else seconds_to_midnight(self._wall()))

            return _Bucket(
                key=key,
                limit=f"{channel}_daily",
                lease=max(1, min(quota // QUOTA_LEASE_SHARE, QUOTA_LEASE_MAX)),
                lease_ttl=left,
                fetch=fetch,
                detail=f"this tenant's daily quota of {quota} {what} is used up until 00:00 UTC",
                refusal_memory=QUOTA_REFUSAL_MEMORY,
            )

        return await self._take(key, bucket)

    def _rate_bucket(
        self, key: str, limit: str, rate: float, burst: int, role: str | None
    ) -> _Bucket:
        """The caller's bucket (`role` names the token's kind), or the tenant's (None)."""
        interval = 1000.0 / rate
        allowed = f"{rate:g} a second, {burst} at once"
        if role is None:
            detail = f"this tenant may send {allowed}, all callers together"
        else:
            detail = f"this {role} token may send {allowed}"

        async def fetch(want: int) -> tuple[int, float]:
            granted, wait_ms = await self._gcra(keys=[key], args=[want, interval, burst])
            return int(granted), float(wait_ms) / 1000

        return _Bucket(key, limit, lease_size(rate, burst), LEASE_TTL, fetch, detail, None)

    async def _take(self, key: str, bucket: Callable[[], _Bucket]) -> Refusal | None:
        """A token of the bucket at `key`: from this instance's lease, else from Redis
        (`bucket` says how to ask); or the refusal."""
        while True:
            now = self._clock()
            refused = self._refused.get(key)
            if refused is not None:
                until, retry_at, refusal = refused
                if until > now:
                    return replace(refusal, retry_after=retry_at - now)
                del self._refused[key]
            lease = self._leases.get(key)
            if lease is not None and lease.tokens > 0 and lease.expires > now:
                lease.tokens -= 1
                return None
            refill = self._refills.get(key)
            if refill is None or refill.done():
                # a finished refill whose done callback has not run yet (this call came in
                # between): awaiting it returns without yielding, and this loop would spin
                # the event loop forever; what it fetched is already in the lease above
                asking = bucket()
                refill = asyncio.create_task(self._refill(asking), name=f"limit:{asking.limit}")
                self._refills[key] = refill
                refill.add_done_callback(functools.partial(self._refilled, key))
            # shielded: one waiter cancelled must not cancel the refill the others wait on
            await asyncio.shield(refill)

    async def _refill(self, bucket: _Bucket) -> None:
        try:
            granted, wait = await bucket.fetch(bucket.lease)
        except (RedisError, OSError) as exc:
            log.warning(
                "rate limit not checked: Redis failed; the send goes through",
                extra={"limit": bucket.limit, "error": repr(exc)},
            )
            granted, wait = 1, 0.0
        now = self._clock()
        self._prune(now)
        if granted > 0:
            self._leases[bucket.key] = _Lease(granted, now + bucket.lease_ttl)
            return
        memory = wait if bucket.refusal_memory is None else min(wait, bucket.refusal_memory)
        self._refused[bucket.key] = (
            now + memory,
            now + wait,
            Refusal(bucket.limit, wait, bucket.detail),
        )

    def _refilled(self, key: str, done: asyncio.Task[None]) -> None:
        if self._refills.get(key) is done:
            del self._refills[key]
        if not done.cancelled():
            done.exception()  # retrieved: a refill nobody awaited logs no warning

    def _give_back(self, key: str) -> None:
        """A send the tenant's bucket refused returns the caller's token to this instance's
        lease: it was taken from Redis but not used, and the caller's next send may use it
        while the lease lasts."""
        lease = self._leases.get(key)
        if lease is not None:
            lease.tokens += 1

    def _prune(self, now: float) -> None:
        if len(self._leases) > MAX_LOCAL_ENTRIES:
            for key in [k for k, lease in self._leases.items() if lease.expires <= now]:
                del self._leases[key]
            while len(self._leases) > MAX_LOCAL_ENTRIES:
                del self._leases[next(iter(self._leases))]
        if len(self._refused) > MAX_LOCAL_ENTRIES:
            for key in [k for k, (until, _, _) in self._refused.items() if until <= now]:
                del self._refused[key]
            while len(self._refused) > MAX_LOCAL_ENTRIES:
                del self._refused[next(iter(self._refused))]
