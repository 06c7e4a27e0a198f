"""How notifyd's Kafka clients reach the cluster: brokers, TLS and SASL, from the settings.

One place for the event source and the delivery-events relay, which must not import each
other (they are actors) but connect the same way.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from notifyd.settings import Settings


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """What any Kafka client of notifyd needs to reach the cluster (also the outbox's)."""

    bootstrap_servers: tuple[str, ...]
    security_protocol: str
    ssl_context: ssl.SSLContext | None
    sasl_mechanism: str
    sasl_username: str
    sasl_password: str

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConnection:
        context = None
        if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
            if settings.kafka_ssl_certfile:
                context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            security_protocol=settings.kafka_security_protocol,
            ssl_context=context,
            sasl_mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            sasl_username=settings.kafka_sasl_username,
            sasl_password=settings.kafka_sasl_password,
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka consumer or producer."""
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
        }
        if self.security_protocol.startswith("SASL_"):
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        return options
