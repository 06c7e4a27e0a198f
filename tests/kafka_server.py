"""A private Apache Kafka broker for tests: one per session, free ports, a temporary folder.

scripts/kafka.py does the work (the jars from Maven Central, cached in .local/kafka-jars;
the KRaft storage formatted; `kafka.Kafka` as a child process); this module is the session
fixture, like tests/rabbitmq_server.py's for RabbitMQ. Without Java or Maven the Kafka tests
are skipped with the reason (bash scripts/bootstrap.sh installs both). Start-up is a few
seconds; `restart` keeps the ports and the data (topics and committed offsets survive).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.kafka import KafkaBroker, fetch_jars


def kafka_missing() -> str | None:
    for command in ("java", "mvn"):
        if shutil.which(command) is None:
            return f"{command} is not installed (bash scripts/bootstrap.sh installs it)"
    return None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    missing = kafka_missing()
    if missing is not None:
        pytest.skip(missing)
    broker = KafkaBroker(Path(tmp_path_factory.mktemp("kafka")), fetch_jars())
    started = time.monotonic()
    broker.start()
    print(f"kafka broker up in {time.monotonic() - started:.1f}s on {broker.bootstrap}")
    try:
        yield broker
    finally:
        broker.close()
