"""Events from Kafka topics: the same JSON events as the Redis stream, one per record.

- One consumer (aiokafka) per instance in the group `NOTIFYD_KAFKA_GROUP`, on the topics
  `NOTIFYD_KAFKA_TOPICS`: the broker splits their partitions between the group's instances
  and moves them when one joins or leaves. Auto-commit is off: this actor commits.
- Each record's event is parsed, checked against the source's binding
  (`NOTIFYD_KAFKA_TENANTS`, `NOTIFYD_KAFKA_ALLOW_CRITICAL`) and accepted (rows + the
  `ingested_events` dedupe row in one transaction); a fetched batch (at most
  `NOTIFYD_KAFKA_MAX_BATCH` records) is handled `NOTIFYD_EVENT_CONCURRENCY` records at once,
  like the other sources (the order of two events is no promise of ingestion: each makes
  notifications of its own). A partition's offset is committed only after every record
  before it is stored: a crash, `kill -9` included, between the rows and the commit makes
  the next owner read the records again, and the (tenant, event id) rows make that a no-op:
  nothing lost, nothing doubled.
- A rebalance waits for the batch in hand (the listener's revoke takes the batch lock), so
  the partitions leave with their offsets committed. Should a commit fail all the same (the
  group moved on: a session that expired during a long retry), the records are read again
  by the new owner and deduplicated.
- A malformed event, or one beyond the binding, is copied to the dead-letter stream with the
  reason and its topic, partition and offset; the partition moves on past it.
- Any other failure (PostgreSQL down) retries the same record with a backoff; after
  `NOTIFYD_EVENT_MAX_DELIVERIES` tries it is dead-lettered too, and the partition moves on.
- A broker that cannot be reached at start makes the actor crash; the supervisor retries it
  with backoff. Once started, aiokafka reconnects by itself (a broker restart is a pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from notifyd.alerts import Alerting
from notifyd.ingest.accept import EventAcceptor
from notifyd.ingest.binding import Binding, admit
from notifyd.ingest.dead_letters import EventDeadLetters
from notifyd.ingest.events import EventLimits, MalformedEvent, parse_event
from notifyd.ingest.kafka_connection import KafkaConnection
from notifyd.keys import Keys
from notifyd.settings import Settings
from notifyd.streams.producer import Producer
from notifyd.supervisor import exponential_backoff, sleep_or_stop

log = logging.getLogger("notifyd.ingest.kafka")

SOURCE = "kafka"
RETRY_BASE_S = 0.5
POLL_MS = 1000  # one fetch waits at most this long, so a stop is seen within a second
STOP_TIMEOUT_S = 10.0  # leaving the group on stop, when the broker does not answer


class _WaitForBatch(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions are given up only between batches: the batch in hand finishes and commits
    first (aiokafka waits for this coroutine before it rejoins the group)."""

    def __init__(self, batch_lock: asyncio.Lock) -> None:
        self._lock = batch_lock

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self._lock:
            if revoked:
                log.info("partitions revoked", extra={"partitions": _names(revoked)})

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": _names(assigned)})


class KafkaEventSource:
    name = "ingest:kafka"

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
        self._connection = KafkaConnection.from_settings(settings)
        self._topics = settings.kafka_topics
        self._group = settings.kafka_group
        self._max_batch = settings.kafka_max_batch
        self._concurrency = settings.event_concurrency
        self._max_deliveries = settings.event_max_deliveries
        self._backoff_cap = settings.actor_backoff_cap
        self._limits = EventLimits.from_settings(settings)
        self._binding = Binding.for_source(settings, SOURCE)
        self._acceptor = acceptor
        self._dead_letters = EventDeadLetters(
            producer, keys, alerts, SOURCE, self._limits.max_bytes
        )
        self._consumer_name = consumer_name
        self._batch_lock = asyncio.Lock()
        self._stop = asyncio.Event()

    def consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            group_id=self._group,
            client_id=f"notifyd-{self._consumer_name}",
            enable_auto_commit=False,
            # a new group reads what was published before it: nothing accepted is lost
            auto_offset_reset="earliest",
            max_poll_records=self._max_batch,
            # the largest event accepted, plus its record's headers and framing
            max_partition_fetch_bytes=max(1_048_576, self._limits.max_bytes + 65_536),
            **self._connection.client_options(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        consumer = self.consumer()
        consumer.subscribe(list(self._topics), listener=_WaitForBatch(self._batch_lock))
        try:
            # raises when no broker answers: the supervisor retries with backoff
            await consumer.start()
            log.info(
                "consuming events",
                extra={"topics": list(self._topics), "group": self._group},
            )
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=POLL_MS)
                if not batch:
                    continue
                async with self._batch_lock:
                    await self._commit(consumer, await self._handle_batch(batch))
        finally:
            # leaves the group, so the partitions move to a peer at once
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await consumer.stop()

    async def _commit(
        self, consumer: AIOKafkaConsumer, handled: Mapping[TopicPartition, int | None]
    ) -> None:
        """Each partition's next offset: after its records' rows are committed, never before."""
        offsets = {tp: OffsetAndMetadata(nxt, "") for tp, nxt in handled.items() if nxt is not None}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # CommitFailedError (the group moved on) is one
            # the next batch's commit covers these; a new owner reads them again (deduplicated)
            log.warning("offsets not committed; the records may be read again", exc_info=exc)

    async def _handle_batch(
        self, batch: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> dict[TopicPartition, int | None]:
        """Every record of the batch, up to NOTIFYD_EVENT_CONCURRENCY at once (a batch often
        holds one partition's records only, so one at a time per partition would be one at a
        time); per partition, the offset to commit next: past the longest run of handled
        records from its start (None: not even the first, because the actor is stopping)."""
        slots = asyncio.Semaphore(self._concurrency)

        async def one(record: ConsumerRecord[bytes, bytes]) -> bool:
            async with slots:
                return await self.handle(record)

        partitions = list(batch.items())
        done = await asyncio.gather(*(one(r) for _, records in partitions for r in records))
        handled: dict[TopicPartition, int | None] = {}
        at = 0
        for tp, records in partitions:
            outcomes, at = done[at : at + len(records)], at + len(records)
            prefix = next((i for i, ok in enumerate(outcomes) if not ok), len(records))
            handled[tp] = records[prefix - 1].offset + 1 if prefix else None
        return handled

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """True once the record's outcome is stored (rows, or a dead letter); False when the
        actor stops first (not committed: read again by whoever owns the partition next)."""
        tries = 0
        while True:
            tries += 1
            try:
                try:
                    event = parse_event(record.value or b"", self._limits)
                    admit(event, self._binding)
                    await self._acceptor.accept(event, source=SOURCE)
                except MalformedEvent as exc:
                    await self._dead_letter(record, str(exc), tries)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if tries >= self._max_deliveries:
                    log.error("event failed; dead-lettered", exc_info=exc, extra={"tries": tries})
                    reason = f"failed {tries} times, last with {type(exc).__name__}"
                    try:
                        await self._dead_letter(record, reason, tries)
                    except Exception:
                        log.exception("dead letter not written; the event is tried again")
                    else:
                        return True
                log.error("event failed; retrying", exc_info=exc, extra={"tries": tries})
                delay = exponential_backoff(tries, RETRY_BASE_S, self._backoff_cap)
                if await sleep_or_stop(self._stop, delay):
                    return False

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, tries: int
    ) -> None:
        where = {
            "topic": record.topic,
            "partition": str(record.partition),
            "offset": str(record.offset),
        }
        described = f"Kafka ({record.topic}[{record.partition}] at offset {record.offset})"
        await self._dead_letters.add(record.value or b"", reason, tries, where, described)


def _names(partitions: Sequence[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
