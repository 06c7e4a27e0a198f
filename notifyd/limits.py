"""The limits one tenant has: rates, daily quotas and socket caps (docs/limits.md).

The settings give the defaults; a platform operator's overrides (`tenant_limits`,
`notifyd limits set`) replace single values for one tenant. The field names are the names
the overrides are stored and set under, so this dataclass is the one list of them. Plain
data, no Redis: the command line reads it without loading the daemon's modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from notifyd.settings import Settings


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one tenant: the settings' defaults, or an operator's
    overrides. The field names are the names an override is stored and set under."""

    rate_user: float
    rate_user_burst: int
    rate_service: float
    rate_service_burst: int
    rate_tenant: float
    rate_tenant_burst: int
    email_daily: int
    sms_daily: int
    sockets_per_user: int
    sockets_per_tenant: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            rate_user=s.rate_user,
            rate_user_burst=s.rate_user_burst,
            rate_service=s.rate_service,
            rate_service_burst=s.rate_service_burst,
            rate_tenant=s.rate_tenant,
            rate_tenant_burst=s.rate_tenant_burst,
            email_daily=s.quota_email_daily,
            sms_daily=s.quota_sms_daily,
            sockets_per_user=s.ws_max_per_user,
            sockets_per_tenant=s.ws_max_per_tenant,
        )

    def overridden(self, overrides: Mapping[str, float]) -> Limits:
        """These limits with `overrides` (name → value) applied; unknown names ignored."""
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name in RATE_NAMES:
                changes[name] = float(value)
            elif name in LIMIT_NAMES:
                changes[name] = int(value)
        return replace(self, **changes)


# the channels a daily quota may count (what platform_quota looks at): others skip the check
QUOTA_CHANNELS = frozenset({"email", "sms"})


def platform_quota(limits: Limits, channel: str, *, own_smtp: bool, own_twilio: bool) -> int:
    """The daily quota a `channel` send of a tenant counts against: email through the global
    relay (the tenant has no SMTP relay of its own), SMS through the platform's Twilio
    account (no account of its own); 0 for everything else (not counted)."""
    if channel == "email" and not own_smtp:
        return limits.email_daily
    if channel == "sms" and not own_twilio:
        return limits.sms_daily
    return 0


LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))
RATE_NAMES = frozenset({"rate_user", "rate_service", "rate_tenant"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which limit said no, and when asking again can succeed."""

    limit: str  # caller, tenant, email_daily, sms_daily (the metric's label)
    retry_after: float  # seconds
    detail: str

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, at least 1 (RFC 9110's delay-seconds)."""
        return str(max(1, math.ceil(self.retry_after)))
