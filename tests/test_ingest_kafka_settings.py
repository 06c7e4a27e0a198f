"""The Kafka source's settings: every value a bound and an error naming the setting.

Promises checked: the seed's `KAFKA_BROKER` names the brokers as
`NOTIFYD_KAFKA_BOOTSTRAP_SERVERS` does; malformed servers, topics, groups, protocols and SASL
mechanisms are refused naming their setting; SASL without a user, a mechanism without SASL
and a client certificate without its key are refused before the daemon starts; the Kafka
source's binding is its own (not the Redis stream's nor RabbitMQ's).
"""

from __future__ import annotations

import pytest

from notifyd.ingest.binding import Binding, open_sources
from notifyd.settings import SettingsError
from notifyd.settings.load import load_settings
from tests.helpers import TEST_JWT_SECRET

BASE = {"DATABASE_URL": "postgresql://localhost/notifyd", "JWT_SECRET": TEST_JWT_SECRET}


def problems(**env: str) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, **env}, dotenv_file=None)
    return str(caught.value)


def test_the_seeds_kafka_broker_names_the_bootstrap_servers() -> None:
    seed = load_settings({**BASE, "KAFKA_BROKER": "kafka:9092"}, dotenv_file=None)
    assert seed.kafka_bootstrap_servers == ("kafka:9092",)
    ours = load_settings(
        {**BASE, "NOTIFYD_KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9093"}, dotenv_file=None
    )
    assert ours.kafka_bootstrap_servers == ("k1:9092", "k2:9093")
    assert ours.kafka_topics == ("notifyd.events",)
    assert ours.kafka_group == "notifyd-ingest"
    assert load_settings(BASE, dotenv_file=None).kafka_bootstrap_servers == ()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KAFKA_BROKER": "kafka"}, "KAFKA_BROKER: host:port"),
        ({"NOTIFYD_KAFKA_TOPICS": "a topic"}, "NOTIFYD_KAFKA_TOPICS: at most 100 topic names"),
        ({"NOTIFYD_KAFKA_TOPICS": ",".join(f"t{n}" for n in range(101))}, "at most 100 topic"),
        ({"NOTIFYD_KAFKA_EVENTS_TOPIC": "a/b"}, "NOTIFYD_KAFKA_EVENTS_TOPIC: a topic name"),
        ({"NOTIFYD_KAFKA_GROUP": "g/1"}, "NOTIFYD_KAFKA_GROUP: 1-249 letters"),
        ({"NOTIFYD_KAFKA_MAX_BATCH": "0"}, "NOTIFYD_KAFKA_MAX_BATCH"),
        ({"NOTIFYD_KAFKA_MAX_BATCH": "10001"}, "NOTIFYD_KAFKA_MAX_BATCH"),
        ({"NOTIFYD_KAFKA_SECURITY_PROTOCOL": "TLS"}, "NOTIFYD_KAFKA_SECURITY_PROTOCOL: PLAINTEXT"),
        ({"NOTIFYD_KAFKA_SASL_MECHANISM": "GSSAPI"}, "NOTIFYD_KAFKA_SASL_MECHANISM: PLAIN"),
        ({"NOTIFYD_KAFKA_SSL_CAFILE": "/nowhere.pem"}, "NOTIFYD_KAFKA_SSL_CAFILE: no file"),
    ],
)
def test_a_bad_value_is_refused_naming_its_setting(env: dict[str, str], expected: str) -> None:
    assert expected in problems(**env)


def test_settings_that_only_make_sense_together_are_checked_together() -> None:
    on = {"KAFKA_BROKER": "kafka:9092"}
    said = problems(**on, NOTIFYD_KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    assert "SASL_* needs NOTIFYD_KAFKA_SASL_MECHANISM and NOTIFYD_KAFKA_SASL_USERNAME" in said
    said = problems(**on, NOTIFYD_KAFKA_SASL_MECHANISM="PLAIN")
    assert "NOTIFYD_KAFKA_SASL_MECHANISM: set, but NOTIFYD_KAFKA_SECURITY_PROTOCOL" in said
    said = problems(NOTIFYD_KAFKA_EVENTS_TOPIC="out")
    assert "NOTIFYD_KAFKA_EVENTS_TOPIC: needs KAFKA_BROKER" in said
    said = problems(**on, NOTIFYD_KAFKA_EVENTS_TOPIC="notifyd.events")
    assert "NOTIFYD_KAFKA_EVENTS_TOPIC: is also in NOTIFYD_KAFKA_TOPICS" in said
    said = problems(**on, NOTIFYD_KAFKA_SSL_CERTFILE=__file__)
    assert "NOTIFYD_KAFKA_SSL_CERTFILE/KEYFILE: set both or neither" in said


def test_the_kafka_binding_is_its_own_and_an_open_one_is_warned_about() -> None:
    settings = load_settings(
        {
            **BASE,
            "KAFKA_BROKER": "kafka:9092",
            "NOTIFYD_KAFKA_TENANTS": "TEN-1",
            "NOTIFYD_KAFKA_ALLOW_CRITICAL": "false",
        },
        dotenv_file=None,
    )
    binding = Binding.for_source(settings, "kafka")
    assert binding.tenants == frozenset({"TEN-1"})
    assert not binding.allow_critical
    assert binding.tenants_setting == "NOTIFYD_KAFKA_TENANTS"
    assert Binding.for_source(settings, "redis").tenants is None
    assert not any("NOTIFYD_KAFKA_TENANTS" in w for w in open_sources(settings))
    opened = load_settings({**BASE, "KAFKA_BROKER": "kafka:9092"}, dotenv_file=None)
    assert any(
        w.startswith("NOTIFYD_KAFKA_TENANTS: is *") and "notifyd.events" in w
        for w in open_sources(opened)
    )
