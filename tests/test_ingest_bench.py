"""`python -m bench ingest` with tiny counts against the test PostgreSQL, Redis and the
session's Kafka broker: its figures match what was stored (every event, no duplicates)."""

from __future__ import annotations

import asyncpg

from bench import ingest
from bench.__main__ import build_parser
from scripts.kafka import KafkaBroker
from tests.helpers import TEST_JWT_SECRET
from tests.kafka_server import kafka  # noqa: F401  (the session fixture)


async def test_ingest_counts_every_event_of_each_source(
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    args = build_parser().parse_args(
        [
            "ingest",
            "--source",
            "kafka",
            "--database-url",
            database_url,
            "--redis-url",
            redis_url,
            "--jwt-secret",
            TEST_JWT_SECRET,
            "--kafka-bootstrap",
            kafka.bootstrap,
            "--count",
            "40",
            "--partitions",
            "2",
            "--timeout",
            "60",
        ]
    )
    result = await ingest.main(ingest.options_from(args))
    assert result["workload"] == "ingest"
    by_source = {s["source"]: s for s in result["sources"]}
    # the command: Kafka first, the Redis stream beside it in the same run
    assert [s["source"] for s in result["sources"]] == ["kafka", "redis"]
    for source, figures in by_source.items():
        assert (figures["stored"], figures["missing"]) == (40, 0), source
        assert figures["per_s"] is None or figures["per_s"] > 0
    rows = await db.fetch("SELECT source, count(*) AS n FROM ingested_events GROUP BY source")
    assert {r["source"]: r["n"] for r in rows} == {"kafka": 40, "redis": 40}
