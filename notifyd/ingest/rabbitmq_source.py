"""Events from a RabbitMQ queue: the same JSON events as the Redis stream, one per message.

- One robust connection (aio-pika) per instance: when the broker restarts or the network
  drops, it reconnects every few seconds (`?reconnect_interval=` in the URL) and restores the
  channel, its prefetch and the consumer. If the broker cannot be reached at start, the actor
  crashes and the supervisor retries with backoff.
- The queue (`NOTIFYD_RABBITMQ_QUEUE`) is used as it is when it exists (its publishers may
  have declared it with arguments, e.g. a quorum queue, that a plain declare would
  contradict), else declared durable. Up to `NOTIFYD_RABBITMQ_PREFETCH` messages are in
  flight at once.
- A message is acknowledged only after its notifications are committed (or it turned out a
  duplicate). If the connection drops in between, the broker delivers it again and the
  (tenant, event id) row makes that a no-op.
- A malformed event, or one for a tenant (or `critical`) beyond the queue's binding
  (`NOTIFYD_RABBITMQ_TENANTS`, `NOTIFYD_RABBITMQ_ALLOW_CRITICAL`), is copied to the
  dead-letter stream with the reason, then acknowledged: requeueing it would only bring it
  back forever.
- Any other failure (PostgreSQL down) returns the message to the queue after a backoff; one
  that failed `NOTIFYD_EVENT_MAX_DELIVERIES` times is dead-lettered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from notifyd.alerts import Alerting
from notifyd.ingest.accept import EventAcceptor
from notifyd.ingest.binding import Binding, admit
from notifyd.ingest.dead_letters import EventDeadLetters
from notifyd.ingest.events import EventLimits, MalformedEvent, parse_event
from notifyd.keys import Keys
from notifyd.settings import Settings, mask_url
from notifyd.streams.producer import Producer
from notifyd.supervisor import exponential_backoff, sleep_or_stop

log = logging.getLogger("notifyd.ingest.rabbitmq")

RETRY_BASE_S = 0.5
CONNECT_TIMEOUT_S = 30.0  # one connection attempt: a broker that accepts but never answers
STOP_TIMEOUT_S = 5.0  # cancelling the consumer on stop, when the broker does not answer
FAILURES_REMEMBERED = 10_000  # messages whose failures are counted (oldest forgotten first)


class RabbitMqEventSource:
    name = "ingest:rabbitmq"

    def __init__(
        self,
        *,
        settings: Settings,
        acceptor: EventAcceptor,
        producer: Producer,
        keys: Keys,
        alerts: Alerting,
        consumer_name: str,
    ) -> None:
        self._url = settings.rabbitmq_url
        self._queue_name = settings.rabbitmq_queue
        self._prefetch = settings.rabbitmq_prefetch
        self._max_deliveries = settings.event_max_deliveries
        self._backoff_cap = settings.actor_backoff_cap
        self._limits = EventLimits.from_settings(settings)
        self._binding = Binding.for_source(settings, "rabbitmq")
        self._acceptor = acceptor
        self._dead_letters = EventDeadLetters(
            producer, keys, alerts, "rabbitmq", self._limits.max_bytes
        )
        self._consumer_name = consumer_name
        self._in_flight: set[asyncio.Task[Any]] = set()
        # failures per message, kept across reconnects and restarts of this actor
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        connection = await aio_pika.connect_robust(
            self._url,
            timeout=CONNECT_TIMEOUT_S,
            client_properties={"connection_name": f"notifyd {self._consumer_name}"},
        )
        try:
            exists = await self._queue_exists()
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.declare_queue(self._queue_name, durable=True, passive=exists)
            tag = await queue.consume(self._on_message)
            log.info(
                "consuming events",
                extra={"broker": mask_url(self._url), "queue": self._queue_name},
            )
            await stop.wait()
            # no new deliveries; those in flight finish (the supervisor's grace bounds it)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await queue.cancel(tag)
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
        except asyncio.CancelledError:
            # past the grace: cut handlers short; their messages go back to the queue
            for task in self._in_flight:
                task.cancel()
            raise
        finally:
            await connection.close()

    async def _queue_exists(self) -> bool:
        """A passive declare, on a connection of its own: a missing queue closes the channel
        it was asked on, and a robust channel would reopen itself behind our back."""
        probe = await aio_pika.connect(self._url, timeout=CONNECT_TIMEOUT_S)
        try:
            channel = await probe.channel()
            try:
                await channel.declare_queue(self._queue_name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            return True
        finally:
            await probe.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika runs this as a task per delivery: keep a reference, to wait on stop."""
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self.handle(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        key = _identity(message)
        try:
            try:
                event = parse_event(message.body, self._limits)
                admit(event, self._binding, publisher=message.user_id)
                await self._acceptor.accept(event, source="rabbitmq")
            except MalformedEvent as exc:
                await self._dead_letter(message, str(exc), self._deliveries(message, key))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(message, key, exc)
            return
        self._failures.pop(key, None)
        await _settle(message.ack())

    async def _failed(self, message: AbstractIncomingMessage, key: str, error: Exception) -> None:
        """Back to the queue after a backoff, or to the dead letters past the bound."""
        failures = self._deliveries(message, key)
        self._failures[key] = failures
        self._failures.move_to_end(key)
        while len(self._failures) > FAILURES_REMEMBERED:
            self._failures.popitem(last=False)
        if failures >= self._max_deliveries:
            log.error("event failed; dead-lettered", exc_info=error, extra={"deliveries": failures})
            try:
                reason = f"failed {failures} times, last with {type(error).__name__}"
                await self._dead_letter(message, reason, failures)
            except Exception:
                log.exception("dead letter not written; the event goes back to the queue")
            else:
                self._failures.pop(key, None)
                await _settle(message.ack())
                return
        else:
            log.error(
                "event failed; back to the queue", exc_info=error, extra={"deliveries": failures}
            )
        await sleep_or_stop(
            self._stop, exponential_backoff(failures, RETRY_BASE_S, self._backoff_cap)
        )
        await _settle(message.nack(requeue=True))

    def _deliveries(self, message: AbstractIncomingMessage, key: str) -> int:
        """This delivery's number: our own count, or the broker's (quorum queues keep one in
        `x-delivery-count`) when that is higher, e.g. after this process restarted."""
        counted = self._failures.get(key, 0) + 1
        header = message.headers.get("x-delivery-count")
        if isinstance(header, int) and not isinstance(header, bool):
            counted = max(counted, header + 1)
        return counted

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, deliveries: int
    ) -> None:
        where = {"queue": self._queue_name}
        if message.message_id:
            where["message_id"] = message.message_id
        described = f"RabbitMQ queue {self._queue_name}"
        await self._dead_letters.add(message.body, reason, deliveries, where, described)


def _identity(message: AbstractIncomingMessage) -> str:
    """What counts a message's failures across redeliveries: its id, else its body."""
    if message.message_id:
        return f"id:{message.message_id}"
    return "sha256:" + hashlib.sha256(message.body).hexdigest()


async def _settle(outcome: Awaitable[None]) -> None:
    """Ack or nack. On a channel that has since closed it cannot be sent, and need not be: the
    broker puts the message back, and a second delivery of a stored event is a no-op."""
    try:
        await outcome
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.info("acknowledgement not sent; the broker redelivers", extra={"error": repr(exc)})
