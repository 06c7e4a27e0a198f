"""`ingest`: N domain events waiting in Kafka (and, beside it in the same run, in the
Redis stream and a RabbitMQ queue): how fast does each source turn them into stored
notifications?

For each source (`--source kafka`: Kafka, then beside it the Redis stream, and RabbitMQ when
`--rabbitmq-url` is given; `--source redis,rabbitmq` measures just those; without `--source`,
every source there is), in one process and against one PostgreSQL and Redis:

1. A daemon (in this process, its own free port) with ingestion off stores the in-app
   template of a tenant of this run only (`bench-<run>-<source>`), and stops.
2. N events of that tenant (one in-app notification each, distinct event ids) are published
   to the source: a Kafka topic of `--partitions` partitions (keyed by event id), the
   `<prefix>:events` stream, or a durable queue. Publishing is not timed.
3. A daemon with the source on starts; the clock runs from its start until N rows of the
   tenant are in `ingested_events` (bounded by `--timeout`).

Figures per source: `per_s` = N ÷ (last row - first row), the steady rate; `wall_s` from
the daemon's start to the last row (start-up and the group's join included); `stored` and
`missing` (should be N and 0). Without `--kafka-bootstrap`, the harness starts a broker of
its own with scripts/kafka.py (Java and Maven needed; the jars are cached in .local/).
The daemons dispatch what they store (in-app: Redis only), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from bench.common import BenchError, TokenMinter, add_env_argument, log, machine, options_of
from notifyd.app import Daemon
from notifyd.settings import Settings
from notifyd.settings.load import load_settings

SOURCES = ("kafka", "redis", "rabbitmq")
TEMPLATE = "bench_event"


@dataclass(slots=True)
class KafkaIngestOptions:
    database_url: str = ""
    redis_url: str = ""
    jwt_secret: str = ""
    kafka_bootstrap: str = ""
    rabbitmq_url: str = ""
    sources: tuple[str, ...] = ("kafka", "redis")
    count: int = 5000
    partitions: int = 4
    timeout: float = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_env_argument(parser, "--database-url", "PostgreSQL of the daemons (migrated)")
    add_env_argument(parser, "--redis-url", "Redis of the daemons")
    add_env_argument(parser, "--jwt-secret", "a JWT_SECRET for the daemons (any 16+ chars)")
    parser.add_argument("--kafka-bootstrap", default="", help="host:port (default: own broker)")
    parser.add_argument("--rabbitmq-url", default="", help="amqp:// URL (adds rabbitmq)")
    parser.add_argument(
        "--source",
        "--sources",
        dest="sources",
        default="",
        help="kafka, redis or rabbitmq: that source, then the others beside it in the same "
        "run; several, comma-separated: just those (default: every source there is)",
    )
    parser.add_argument("--count", type=int, default=5000, help="events per source (N)")
    parser.add_argument("--partitions", type=int, default=4, help="of the Kafka topic")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per source")


def options_from(args: argparse.Namespace) -> KafkaIngestOptions:
    named = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = [s for s in named if s not in SOURCES]
    if unknown:
        raise BenchError(f"--source: unknown {', '.join(unknown)} (of {', '.join(SOURCES)})")
    if "rabbitmq" in named and not args.rabbitmq_url:
        raise BenchError("--source rabbitmq needs --rabbitmq-url")
    available = ("kafka", "redis", "rabbitmq") if args.rabbitmq_url else ("kafka", "redis")
    if len(named) == 1:  # the source under test first, the others beside it
        sources: tuple[str, ...] = (*named, *(s for s in available if s not in named))
    else:
        sources = named or available
    if args.count < 1 or args.partitions < 1:
        raise BenchError("--count and --partitions must be at least 1")
    return options_of(KafkaIngestOptions, args, sources=sources)


def _event(tenant: str, n: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"e-{n}",
            "tenant_id": tenant,
            "type": "bench.event",
            "template_key": TEMPLATE,
            "context": {"n": n},
            "recipients": [{"user_id": f"u-{n % 100}"}],
            "channels": ["in_app"],
        }
    )


@contextlib.asynccontextmanager
async def _kafka(bootstrap: str) -> AsyncIterator[str]:
    """The broker to use: the one given, else one of our own for the run."""
    if bootstrap:
        yield bootstrap
        return
    from scripts.kafka import KafkaBroker, KafkaError, fetch_jars

    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as folder:
        try:
            broker = KafkaBroker(Path(folder), await asyncio.to_thread(fetch_jars))
            started = time.monotonic()
            await asyncio.to_thread(broker.start)
        except KafkaError as exc:
            raise BenchError(f"no Kafka broker: {exc}") from None
        log(f"kafka broker up in {time.monotonic() - started:.1f}s on {broker.bootstrap}")
        try:
            yield broker.bootstrap
        finally:
            await asyncio.to_thread(broker.close)


class _Run:
    def __init__(self, o: KafkaIngestOptions, kafka: str, run_id: str) -> None:
        self.o = o
        self.kafka = kafka
        self.run_id = run_id

    def settings(self, source: str | None, **env: str) -> Settings:
        base = {
            "DATABASE_URL": self.o.database_url,
            "REDIS_URL": self.o.redis_url,
            "JWT_SECRET": self.o.jwt_secret,
            "NOTIFYD_HOST": "127.0.0.1",
            "NOTIFYD_PORT": "0",
            "NOTIFYD_LOG_LEVEL": "warning",
            "NOTIFYD_EVENTS_ENABLED": "false" if source is None else "true",
        }
        if source == "kafka":
            base |= {
                "NOTIFYD_KAFKA_BOOTSTRAP_SERVERS": self.kafka,
                "NOTIFYD_KAFKA_TOPICS": f"bench.{self.run_id}",
                "NOTIFYD_KAFKA_GROUP": f"bench-{self.run_id}",
            }
        if source == "rabbitmq":
            base |= {
                "NOTIFYD_RABBITMQ_URL": self.o.rabbitmq_url,
                "NOTIFYD_RABBITMQ_QUEUE": f"bench.{self.run_id}",
            }
        return load_settings({**base, **env}, dotenv_file=None)

    async def template(self, tenant: str) -> None:
        daemon = Daemon(self.settings(None))
        await daemon.start()
        try:
            token = TokenMinter(self.o.jwt_secret).mint(
                tenant_id=tenant, user_id="bench-admin", role="admin", ttl=600
            )
            url = f"http://127.0.0.1:{daemon.port}/templates/{TEMPLATE}/in_app/"
            async with (
                aiohttp.ClientSession() as http,
                http.put(
                    url,
                    json={"text_body": "Event {{ n }}"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as response,
            ):
                if response.status != 200:
                    raise BenchError(f"PUT template: {response.status} {await response.text()}")
        finally:
            await daemon.stop()

    async def publish(self, source: str, tenant: str) -> None:
        events = [_event(tenant, n) for n in range(self.o.count)]
        if source == "kafka":
            topic = f"bench.{self.run_id}"
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(topic, self.o.partitions, 1)])
            finally:
                await admin.close()
            producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all", linger_ms=5)
            await producer.start()
            try:
                sent = [
                    await producer.send(topic, raw, key=f"e-{n}".encode())
                    for n, raw in enumerate(events)
                ]
                await asyncio.gather(*sent)
            finally:
                await producer.stop()
        elif source == "redis":
            redis = Redis.from_url(self.o.redis_url)
            try:
                for start in range(0, len(events), 500):
                    async with redis.pipeline(transaction=False) as pipe:
                        for raw in events[start : start + 500]:
                            pipe.xadd("notifyd:events", {"event": raw})
                        await pipe.execute()
            finally:
                await redis.aclose()
        else:
            connection = await aio_pika.connect(self.o.rabbitmq_url)
            try:
                channel = await connection.channel(publisher_confirms=True)
                queue = f"bench.{self.run_id}"
                await channel.declare_queue(queue, durable=True)
                for raw in events:
                    await channel.default_exchange.publish(
                        aio_pika.Message(raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue,
                    )
            finally:
                await connection.close()

    async def measure(self, source: str) -> dict[str, Any]:
        tenant = f"bench-{self.run_id}-{source}"
        await self.template(tenant)
        await self.publish(source, tenant)
        conn = await asyncpg.connect(self.o.database_url)
        daemon = Daemon(self.settings(source))
        started = time.monotonic()
        await daemon.start()
        first: float | None = None
        stored = 0
        try:
            deadline = started + self.o.timeout
            while time.monotonic() < deadline:
                stored = await conn.fetchval(
                    "SELECT count(*) FROM ingested_events WHERE tenant_id = $1", tenant
                )
                if stored and first is None:
                    first = time.monotonic()
                if stored >= self.o.count:
                    break
                await asyncio.sleep(0.05)
            last = time.monotonic()
        finally:
            await daemon.stop()
            await conn.close()
        steady = (last - first) if first is not None else 0.0
        return {
            "source": source,
            "count": self.o.count,
            "stored": stored,
            "missing": self.o.count - stored,
            "per_s": round(stored / steady, 1) if steady > 0 else None,
            "wall_s": round(last - started, 2),
        }


async def main(o: KafkaIngestOptions) -> dict[str, Any]:
    if not (o.database_url and o.redis_url and len(o.jwt_secret) >= 16):
        raise BenchError("needs --database-url, --redis-url and a --jwt-secret of 16+ chars")
    run_id = secrets.token_hex(4)
    results = []
    async with _kafka(o.kafka_bootstrap if "kafka" in o.sources else "unused") as kafka:
        run = _Run(o, kafka, run_id)
        for source in o.sources:
            log(f"ingest: {o.count} events through {source}")
            results.append(await run.measure(source))
    return {
        "workload": "ingest",
        "partitions": o.partitions,
        "sources": results,
        "machine": machine(),
    }
