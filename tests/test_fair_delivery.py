"""Fair delivery across tenants: one tenant's backlog or dead relay costs the others nothing.

Real daemons, PostgreSQL, Redis and aiosmtpd; a tenant's own relay is `bench.relay.SwitchRelay`,
a real TCP server that accepts and never answers (hung) until it recovers and forwards to the
real sink. Promises checked (each test names its own): another tenant's mail arrives while a
tenant's relay hangs, and the hung tenant's mail arrives exactly once after it recovers; the
relay's circuit breaker opens, parks (no attempt used, `last_error` says so without the relay's
words, metrics show it) and closes again; a tenant never has more than its cap of sends in
flight; two instances racing over parked entries send each once; parked entries survive a
daemon that stops and a Redis that loses everything. The gate, breaker and pacer themselves
are checked as plain objects at the end (round-robin order, half open, spacing).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.relay import SwitchRelay
from notifyd.app import Daemon
from notifyd.fairness import Breaker, BreakerState, FairGate, Full, Pacer, SendTimes
from notifyd.keys import SEND_GROUP, Keys
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink

A = "TEN-A"  # its own relay: hung
B = "TEN-B"  # the platform relay: healthy
FROM = "jobs@lumina.example"

FAIR: dict[str, str] = {
    "EMAIL_HOST": "127.0.0.1",
    "EMAIL_FROM": FROM,
    # tenant A's relay is on loopback, on a port of the test's own
    "NOTIFYD_EGRESS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NOTIFYD_EGRESS_ALLOWED_PORTS": "any",
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "20",
    # a hung relay holds a send this long on a sender without connect timeouts
    "NOTIFYD_SEND_TIMEOUT": "5",
    "NOTIFYD_SHUTDOWN_TIMEOUT": "8",
    "NOTIFYD_SMTP_CONNECT_TIMEOUT": "0.5",
    "NOTIFYD_BREAKER_FAILURES": "3",
    "NOTIFYD_BREAKER_COOLDOWN": "1",
    "NOTIFYD_TENANT_SEND_CONCURRENCY": "2",
    # each cool-down's probe uses an attempt of one message: no message may run out here
    "NOTIFYD_SEND_MAX_ATTEMPTS": "50",
}


@pytest.fixture
async def relay(smtp_sink: SmtpSink) -> AsyncIterator[SwitchRelay]:
    """Tenant A's relay: hung until `recover()`, then forwarding to the sink."""
    switch = SwitchRelay(smtp_sink.port)
    await switch.start()
    yield switch
    await switch.close()


async def start(daemon_factory: DaemonFactory, sink: SmtpSink, **env: str) -> Daemon:
    return await daemon_factory(**{**FAIR, "EMAIL_PORT": str(sink.port), **env})


async def use_relay(api: Api, tenant: str, port: int) -> None:
    smtp = {"host": "127.0.0.1", "port": port, "from_email": "hr@a.example"}
    status, body, _ = await api.request(
        "PUT",
        "/tenants/current/settings/",
        json={"smtp": smtp},
        tenant=tenant,
        user="admin",
        role="admin",
    )
    assert status == 200, body


async def send_many(api: Api, tenant: str, count: int) -> list[str]:
    async def one(i: int) -> str:
        status, body, _ = await api.post(
            "/notifications/send/",
            {
                "notification_type": "email",
                "recipient": f"{tenant.lower()}-{i}@example.com",
                "subject": f"{tenant} #{i}",
                "message": "Your interview is tomorrow at 10 AM.",
            },
            tenant=tenant,
            user="backend",
            role="service",
        )
        assert status == 202, body
        return str(body["notification_id"])

    ids: list[str] = []
    for first in range(0, count, 20):
        ids += await asyncio.gather(*(one(i) for i in range(first, min(count, first + 20))))
    return ids


def arrivals(sink: SmtpSink, ids: list[str]) -> Counter[str]:
    wanted = set(ids)
    return Counter(r.notifyd_id for r in list(sink.received) if r.notifyd_id in wanted)


async def all_arrived_once(sink: SmtpSink, db: asyncpg.Connection, ids: list[str]) -> None:
    """Every id arrived, none twice, every row `sent` (waits for the rows, then the sink)."""

    async def sent() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM notifications WHERE id = ANY($1::uuid[]) AND status = 'sent'",
            ids,
        )
        return bool(n == len(ids))

    await wait_for(sent, timeout=40)
    await wait_for(lambda: len(arrivals(sink, ids)) == len(ids), timeout=10)
    counts = arrivals(sink, ids)
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1]


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


async def parked_rows(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    """Rows waiting without having used an attempt: parked, not retried."""
    return await db.fetch(
        "SELECT id, last_error, next_attempt_at FROM notifications "
        "WHERE tenant_id = $1 AND status = 'retrying' AND attempts = 0",
        tenant,
    )


async def test_a_hung_tenant_relay_does_not_delay_another_tenants_mail(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, relay: SwitchRelay, db: asyncpg.Connection
) -> None:
    """Promise: tenant A's relay accepts connections and never answers while A sends 100
    emails; tenant B's 10 emails through the healthy platform relay still arrive promptly
    (each sender slot a hung relay held for the whole send timeout starved B before). Once A's
    relay recovers, every one of A's emails arrives exactly once."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await use_relay(api, A, relay.port)
        a_ids = await send_many(api, A, 100)
        await wait_for(lambda: relay.accepted >= 1)  # A's sends are hanging on its relay
        b_ids = await send_many(api, B, 10)
        # 100 sends held for 5 s each by 32 slots: about 15 s before B's first without fairness
        await wait_for(lambda: len(arrivals(smtp_sink, b_ids)) == 10, timeout=6)
        assert arrivals(smtp_sink, a_ids) == Counter()  # A's relay is still hung
        relay.recover()
        await all_arrived_once(smtp_sink, db, a_ids)
        await all_arrived_once(smtp_sink, db, b_ids)


async def test_a_lone_tenants_burst_past_its_queue_is_held_and_sent_not_set_aside(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: with no other tenant's mail behind it, a tenant's burst far past its queue
    costs what it did before fairness: the entries past the queue are held and each takes a
    slot as one frees, none is set aside (which would delay it by the park delay)."""
    daemon = await start(
        daemon_factory,
        smtp_sink,
        NOTIFYD_EMAIL_CONCURRENCY="4",  # a window of 32 entries: 2 sending, 2 queued, 28 held
        NOTIFYD_TENANT_SEND_QUEUE="2",
        NOTIFYD_TENANT_PARK_DELAY="60",  # a set-aside entry would not be back in the test
    )
    async with Api(daemon) as api:
        ids = await send_many(api, B, 120)
    # a held entry gives up after a quarter of NOTIFYD_CLAIM_IDLE (5 s here) and is set aside
    await wait_for(lambda: len(arrivals(smtp_sink, ids)) == len(ids), timeout=10)
    await all_arrived_once(smtp_sink, db, ids)
    assert (
        sample(daemon, "notifyd_deliveries_parked_total", channel="email", reason="tenant_cap") == 0
    )


async def test_the_breaker_opens_parks_without_attempts_and_closes_again(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: after NOTIFYD_BREAKER_FAILURES failures to reach a tenant's relay its circuit
    opens: its mail is parked on the timer wheel without a connection and without using an
    attempt, `last_error` names the relay and when it is tried again (never the relay's own
    words), and /metrics shows the open circuit and the parked count. When the relay answers
    again, a probe closes the circuit, everything arrives once and `last_error` is cleared."""
    relay = SwitchRelay(smtp_sink.port)
    port = await relay.start()
    try:
        daemon = await start(daemon_factory, smtp_sink)
        async with Api(daemon) as api:
            await use_relay(api, A, port)
            ids = await send_many(api, A, 20)
            state = {"channel": "email", "relay": A}
            await wait_for(
                lambda: sample(daemon, "notifyd_relay_breaker_state", **state) == 1, timeout=10
            )

            async def breaker_parked() -> list[asyncpg.Record]:
                # (a few may have been parked for A's cap first: those keep last_error NULL)
                return [r for r in await parked_rows(db, A) if r["last_error"] is not None]

            async def many_parked() -> bool:
                return len(await breaker_parked()) >= 10

            await wait_for(many_parked, timeout=10)
            for row in await breaker_parked():
                assert row["last_error"].startswith(
                    f"relay 127.0.0.1:{port} unavailable (circuit open after 3 failures); "
                    "parked until "
                ), row["last_error"]
            # the counter follows the rows' commit (a parked batch counts after its write)
            await wait_for(
                lambda: (
                    sample(
                        daemon, "notifyd_deliveries_parked_total", channel="email", reason="breaker"
                    )
                    >= 10
                ),
                timeout=5,
            )
            # parked mail does not touch the relay: a connection per attempt only
            attempts = await db.fetchval(
                "SELECT sum(attempts) FROM notifications WHERE tenant_id = $1", A
            )
            assert relay.accepted <= attempts + 2 * len(ids)  # a send reconnects once at most
            assert attempts < len(ids)

            relay.recover()
            await all_arrived_once(smtp_sink, db, ids)
            assert sample(daemon, "notifyd_relay_breaker_state", **state) == 0
            errors = await db.fetch(
                "SELECT last_error FROM notifications WHERE id = ANY($1::uuid[])", ids
            )
            assert {r["last_error"] for r in errors} == {None}
    finally:
        await relay.close()


async def test_a_slow_tenant_never_has_more_than_its_cap_of_sends_in_flight(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: with connections to spare (10 per relay) and 16 sender slots, a tenant whose
    relay is slow (each command 0.25 s: over a second a message) never has more than
    NOTIFYD_TENANT_SEND_CONCURRENCY (2) connections open to it at once (only a tenant whose
    sends are proven fast may borrow idle slots), and all of its 12 emails arrive once."""
    relay = SwitchRelay(smtp_sink.port, delay=0.25)
    port = await relay.start()
    relay.recover()
    try:
        daemon = await start(
            daemon_factory,
            smtp_sink,
            NOTIFYD_SMTP_CONNECTIONS_PER_TENANT="10",
            NOTIFYD_EMAIL_CONCURRENCY="16",
        )
        async with Api(daemon) as api:
            await use_relay(api, A, port)
            ids = await send_many(api, A, 12)
            await all_arrived_once(smtp_sink, db, ids)
        assert 1 <= relay.peak <= 2, relay.peak
    finally:
        await relay.close()


async def test_two_instances_racing_over_parked_entries_send_each_once(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, relay: SwitchRelay, db: asyncpg.Connection
) -> None:
    """Promise: two instances share the stream and the wheel; both park A's mail while its
    relay hangs, the parked entries come back to whichever instance reads them, and after the
    relay recovers each email arrives exactly once."""
    first = await start(daemon_factory, smtp_sink)
    second = await start(daemon_factory, smtp_sink)
    async with Api(first) as api:
        await use_relay(api, A, relay.port)
        ids = await send_many(api, A, 60)

    def parked(daemon: Daemon) -> float:
        return sample(daemon, "notifyd_deliveries_parked_total", channel="email", reason="breaker")

    await wait_for(lambda: parked(first) + parked(second) >= 20, timeout=15)
    relay.recover()
    await all_arrived_once(smtp_sink, db, ids)


async def test_parked_mail_survives_a_stopped_daemon_and_a_redis_that_lost_everything(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    relay: SwitchRelay,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    """Promise: parked is durable. With A's mail parked, the daemon stops (its sender cut off
    mid-send) and Redis loses its streams and wheel; a new daemon rebuilds the parked entries
    from PostgreSQL (they are retries that used no attempt), and after the relay recovers
    every email arrives exactly once."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await use_relay(api, A, relay.port)
        ids = await send_many(api, A, 30)

    async def parked() -> bool:
        return len(await parked_rows(db, A)) >= 10

    await wait_for(parked, timeout=15)
    await daemon.stop()
    await redis.flushdb()
    relay.recover()
    await start(daemon_factory, smtp_sink, NOTIFYD_REQUEUE_AFTER="1", NOTIFYD_SWEEP_INTERVAL="0.2")
    await all_arrived_once(smtp_sink, db, ids)


async def xack_calls(redis: Redis) -> int:
    """XACK commands the server ran so far (within a script, one per call of it)."""
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_xack", {}).get("calls", 0))


async def test_a_held_backlog_is_set_aside_in_a_few_script_calls_once_another_tenant_waits(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    relay: SwitchRelay,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    """Promise: a tenant's backlog past its queue (its relay hangs, its circuit has not
    opened) is passed quickly once another tenant's mail is queued behind it: the entries
    held in memory are set aside together, and those not read yet (past the sender's
    window of 256) a read at a time, the wheel entries and the acks one script call each
    time, not one XACK per entry; the other tenant's email arrives, and no entry of the
    backlog is lost (each is on the wheel, its row still `dispatched`)."""
    daemon = await start(
        daemon_factory,
        smtp_sink,
        NOTIFYD_SMTP_CONNECT_TIMEOUT="5",  # A's two sends hang through the test
        NOTIFYD_BREAKER_FAILURES="1000",  # no circuit: the backlog is only set aside
        NOTIFYD_TENANT_SEND_QUEUE="4",
        NOTIFYD_TENANT_PARK_DELAY="60",  # nothing comes back from the wheel meanwhile
    )

    def set_aside() -> float:
        return sample(
            daemon, "notifyd_deliveries_parked_total", channel="email", reason="tenant_cap"
        )

    async with Api(daemon) as api:
        await use_relay(api, A, relay.port)
        a_ids = await send_many(api, A, 320)
        await wait_for(lambda: relay.accepted >= 2)  # A's two sends hang; the rest wait

        stream = Keys(daemon.settings.redis_prefix).deliver("email")

        async def window_full() -> bool:  # 2 sending, 4 queued, 250 held, 64 not read yet
            pending: Any = await redis.xpending(stream, SEND_GROUP)
            return bool(int(pending["pending"]) == 256 and await redis.xlen(stream) == 320)

        await wait_for(window_full, timeout=15)
        assert set_aside() == 0  # no other tenant behind: a lone tenant's burst is held
        before = await xack_calls(redis)
        b_ids = await send_many(api, B, 1)
        await wait_for(lambda: len(arrivals(smtp_sink, b_ids)) == 1, timeout=10)
        await wait_for(lambda: set_aside() >= 314, timeout=10)  # 320 - 2 sending - 4 queued
        parked = set_aside()
        acks = await xack_calls(redis) - before
    # the held entries in one script call (its XACK), the unread a few reads' worth, plus
    # B's own entries' acks on their way (accepted, dispatched, sent): not one per entry
    assert acks <= parked / 10, (acks, parked)
    assert daemon.pipeline is not None
    waiting = {
        item.fields["id"]
        for item, _ in await daemon.pipeline.schedule.pending()
        if item.key == "waiting"
    }
    assert len(waiting) >= 314 and waiting <= set(a_ids)  # every one set aside is stored
    rows = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1::uuid[]) AND status = 'dispatched'",
        list(waiting),
    )
    assert rows == len(waiting)  # the sweeper's cover, should Redis lose the wheel
    assert arrivals(smtp_sink, a_ids) == Counter()


# --- the pieces themselves: plain objects, a clock of the test's own ------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_the_gate_serves_tenants_round_robin_within_their_caps() -> None:
    """Promise: with every slot busy, freed slots go to the waiting tenants in turn (a tenant
    with a long queue does not go twice before one that waits), never past a tenant's cap,
    and a tenant may queue only so many entries (`Full`: the sender parks the rest)."""
    gate = FairGate(slots=2, per_tenant=1, queue_per_tenant=3)
    await gate.acquire("a")
    await gate.acquire("b")
    order: list[str] = []

    async def wait(tenant: str) -> None:
        await gate.acquire(tenant)
        order.append(tenant)

    waiters = [asyncio.create_task(wait(t)) for t in ("a", "a", "a", "c", "b")]
    await asyncio.sleep(0)
    with pytest.raises(Full):
        await gate.acquire("a")  # three of a's wait already
    assert gate.waiting("a") == 3
    for tenant in ("a", "b", "a", "c", "a"):
        gate.release(tenant)
        await asyncio.sleep(0)
    # a's second entry waits for c and b, who came after it but had nothing in flight
    assert order == ["a", "c", "b", "a", "a"]
    assert gate.in_flight("a") == 1 and gate.waiting("a") == 0
    await asyncio.gather(*waiters)


async def test_a_tenant_at_its_cap_waits_though_a_slot_is_free() -> None:
    """Promise: a tenant never holds more than its cap of slots unless it may borrow: a freed
    slot is not handed to a capped tenant (without borrowing, a hung relay's tenant would
    fill every slot the others free)."""
    gate = FairGate(slots=3, per_tenant=1, queue_per_tenant=3)
    await gate.acquire("a")
    await gate.acquire("b")
    waiter = asyncio.create_task(gate.acquire("a"))
    await asyncio.sleep(0)
    assert gate.waiting("a") == 1
    gate.release("b")  # two slots free now, and a is the only tenant with work
    await asyncio.sleep(0)
    assert not waiter.done() and gate.in_flight("a") == 1
    gate.release("a")
    await asyncio.wait_for(waiter, 1.0)
    assert gate.in_flight("a") == 1


async def test_a_lone_fast_tenant_borrows_idle_slots_but_leaves_a_cap_for_newcomers() -> None:
    """Promise: the gate is work-conserving: a tenant past its cap may borrow idle slots
    while nobody else waits and its sends are fast, but never the last `per_tenant` slots,
    so a tenant that turns up gets its cap at once; a slow tenant borrows nothing."""
    fast = {"a"}
    gate = FairGate(slots=4, per_tenant=1, queue_per_tenant=4, may_borrow=fast.__contains__)
    for _ in range(3):
        await gate.acquire("a")  # one under its cap, two borrowed
    assert gate.in_flight("a") == 3
    blocked = asyncio.create_task(gate.acquire("a"))  # the last slot is not lent
    await asyncio.sleep(0)
    assert not blocked.done()
    await gate.acquire("b")  # a newcomer: at once
    gate.release("b")
    await asyncio.sleep(0)
    assert not blocked.done() and gate.in_flight("a") == 3  # still not the last slot
    gate.release("a")
    await asyncio.sleep(0)
    assert blocked.done() and gate.in_flight("a") == 3  # a borrowed slot freed: borrowed again
    slow = FairGate(slots=4, per_tenant=1, queue_per_tenant=4, may_borrow=fast.__contains__)
    await slow.acquire("s")
    waiting = asyncio.create_task(slow.acquire("s"))
    await asyncio.sleep(0)
    assert not waiting.done() and slow.in_flight("s") == 1
    waiting.cancel()


async def test_a_slot_freed_while_waiters_are_cancelled_goes_to_a_live_one() -> None:
    """Promise: waiters that give up (a timeout cancels them) never receive a slot, even
    when the slot frees before their cancellation is handled, and never lose one."""
    gate = FairGate(slots=1, per_tenant=1, queue_per_tenant=5)
    await gate.acquire("a")
    gone = [asyncio.create_task(gate.acquire("a")) for _ in range(2)]
    live = asyncio.create_task(gate.acquire("a"))
    await asyncio.sleep(0)
    for task in gone:
        task.cancel()
    gate.release("a")  # before the cancelled waiters ran their handlers
    await asyncio.sleep(0)
    assert live.done() and gate.in_flight("a") == 1
    assert all(task.cancelled() for task in gone)
    gate.release("a")
    assert gate.in_flight("a") == 0 and gate.waiting("a") == 0


def test_the_breaker_opens_half_opens_with_one_probe_and_closes() -> None:
    """Promise: N consecutive failures open the circuit (mail parked until the cool-down
    ends), after it exactly one probe is let through (the rest still parked), a failed probe
    opens it again, a successful one closes it; an answer in between resets the count."""
    clock = Clock()
    breaker = Breaker("TEN-A", "relay.a.example:25", 3, 30.0, 11.0, clock=clock)
    assert breaker.check() is None
    assert not breaker.failed() and not breaker.failed()
    breaker.succeeded()  # an answer: the count starts again
    assert not breaker.failed() and not breaker.failed()
    assert breaker.failed() and breaker.state is BreakerState.OPEN
    parked = breaker.check()
    assert parked is not None and parked.until == clock.now + 30
    assert parked.reason.startswith(
        "relay relay.a.example:25 unavailable (circuit open after 3 failures); parked until "
    )
    clock.now += 30
    assert breaker.check() is None and breaker.state is BreakerState.HALF_OPEN  # the probe
    assert breaker.check() is not None  # only one
    assert breaker.failed() and breaker.state is BreakerState.OPEN  # the probe failed
    clock.now += 30
    assert breaker.check() is None
    breaker.abandon()  # the probe sent nothing: the next send probes
    assert breaker.check() is None and breaker.state is BreakerState.HALF_OPEN
    assert breaker.succeeded() and breaker.state is BreakerState.CLOSED
    assert breaker.check() is None and breaker.parked_until() is None
    clock.now += 100
    # a probe never heard back from is given up on after its timeout
    for _ in range(3):
        breaker.failed()
    clock.now += 30
    assert breaker.check() is None
    clock.now += 11
    assert breaker.check() is None and breaker.state is BreakerState.HALF_OPEN


def test_the_pacer_spreads_a_capped_tenants_parked_entries() -> None:
    """Promise: a capped tenant's parked entries come back one `interval` apart after the
    shortest delay, per tenant, so a backlog returns at the rate it can be sent."""
    clock = Clock()
    pacer = Pacer(0.5, 2.0, clock=clock)
    assert [pacer.next("a", 0.1) - clock.now for _ in range(3)] == pytest.approx([0.5, 0.6, 0.7])
    assert pacer.next("b", 0.1) - clock.now == pytest.approx(0.5)
    clock.now += 10
    assert pacer.next("a", 0.1) - clock.now == pytest.approx(0.5)
    # never later than the longest park: a larger backlog comes back in bunches
    assert [pacer.next("c", 1.0) - clock.now for _ in range(4)] == pytest.approx(
        [0.5, 1.5, 2.0, 2.0]
    )


def test_send_times_count_a_hung_send_before_it_finishes() -> None:
    """Promise: a tenant's send time is the moving average of its finished sends, or the age
    of its oldest running send when that is longer (a hung relay's sends never finish)."""
    clock = Clock()
    times = SendTimes(0.05, clock=clock)
    assert times.estimate("a") == pytest.approx(0.05) and not times.known("a")
    started = times.started("a")
    clock.now += 4
    assert times.estimate("a") == pytest.approx(4)
    times.finished("a", started)
    assert times.known("a") and times.estimate("a") == pytest.approx(4)  # its first: as is
    started = times.started("a")
    clock.now += 1
    times.finished("a", started)
    assert times.estimate("a") == pytest.approx(4 + (1 - 4) * 0.2)
    # a tenant not heard of takes the channel's average (of every answered send)
    channel = 0.05 + (4 - 0.05) * 0.05
    assert times.estimate("b") == pytest.approx(channel + (1 - channel) * 0.05)
    assert times.healthy("a") and not times.healthy("b")
    times.finished("a", times.started("a"), answered=False)  # the relay went away
    assert times.known("a") and not times.healthy("a")
    times.finished("a", times.started("a"))
    assert times.healthy("a")
