"""Every Redis key notifyd uses, in one place, under one configurable prefix.

Keeping the names here (as arq does in its constants module) means a reader can see the whole
Redis footprint at a glance, and two deployments can share one Redis by choosing prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

DISPATCH_GROUP = "dispatch"
SEND_GROUP = "send"
FIRE_GROUP = "fire"
INGEST_GROUP = "ingest"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "notifyd"

    @property
    def intents(self) -> str:
        """Stream of notification intents, consumed by the dispatcher group."""
        return f"{self.prefix}:intents"

    @property
    def dead_letters(self) -> str:
        """Stream of entries that could not be handled after their last attempt."""
        return f"{self.prefix}:dead"

    def deliver(self, channel: str) -> str:
        """Per-channel delivery stream, consumed by that channel's sender group."""
        return f"{self.prefix}:deliver:{channel}"

    def consumer_groups(self) -> list[tuple[str, str]]:
        """Every (stream, group) notifyd consumes, for housekeeping."""
        return [
            (self.intents, DISPATCH_GROUP),
            *[(self.deliver(channel), SEND_GROUP) for channel in ("email", "sms", "in_app")],
            (self.reminders, FIRE_GROUP),
            (self.workflow_steps, FIRE_GROUP),
            (self.events, INGEST_GROUP),
        ]

    @property
    def events(self) -> str:
        """Stream of domain events other services publish, consumed by the ingest group."""
        return f"{self.prefix}:events"

    @property
    def reminders(self) -> str:
        """Stream of due reminders, moved there by the timer, consumed by the fire group."""
        return f"{self.prefix}:reminders"

    @property
    def workflow_steps(self) -> str:
        """Stream of due workflow steps, moved there by the timer, consumed by the fire group."""
        return f"{self.prefix}:workflow-steps"

    @property
    def wheel_epoch(self) -> str:
        """Set when the wheel was rebuilt; gone means Redis lost its data: rebuild again."""
        return f"{self.prefix}:timer:epoch"

    @property
    def timer(self) -> str:
        """Sorted set of stream entries due later (retries, reminders), scored by due time."""
        return f"{self.prefix}:timer"

    def tenant_config(self, tenant_id: str) -> str:
        """The ETag of a tenant's configuration document some instance last validated at the
        source, expiring with that validation's TTL (never the document: it holds secrets)."""
        return f"{self.prefix}:tenant-config:{len(tenant_id)}:{tenant_id}"

    def alert_gate(self, kind: str) -> str:
        """Rate limit of operator alert emails of one kind, shared by every instance."""
        return f"{self.prefix}:alert:{kind}"

    @property
    def hub_heartbeat(self) -> str:
        """A channel every hub subscribes to, so its pub/sub connection is never idle-empty."""
        return f"{self.prefix}:live:hub"

    def user_history(self, tenant_id: str, user_id: str) -> str:
        """Capped stream of one user's live events, for replay after a reconnect."""
        return f"{self.prefix}:history:{len(tenant_id)}:{tenant_id}:{user_id}"

    def user_events(self, tenant_id: str, user_id: str) -> str:
        """Pub/sub channel for one user's live events (tenant first: isolation by name)."""
        return f"{self.prefix}:live:{len(tenant_id)}:{tenant_id}:{user_id}"

    def room_history(self, tenant_id: str, room: str) -> str:
        """Capped stream of one chat room's messages and receipts, for replay."""
        return f"{self.prefix}:history:room:{len(tenant_id)}:{tenant_id}:{room}"

    def room_events(self, tenant_id: str, room: str) -> str:
        """Pub/sub channel of one chat room (messages, typing, presence, receipts)."""
        return f"{self.prefix}:live:room:{len(tenant_id)}:{tenant_id}:{room}"

    def presence(self, tenant_id: str, room: str) -> str:
        """Prefix of one room's presence keys: `:conns` (zset by expiry), `:who`, `:users`."""
        return f"{self.prefix}:presence:{len(tenant_id)}:{tenant_id}:{room}"

    def caller_rate(self, tenant_id: str, role: str, user_id: str) -> str:
        """GCRA state (theoretical arrival time, ms) of one caller's sends."""
        return f"{self.prefix}:rate:{len(tenant_id)}:{tenant_id}:{role}:{user_id}"

    def tenant_rate(self, tenant_id: str) -> str:
        """GCRA state of every send of one tenant."""
        return f"{self.prefix}:rate:{len(tenant_id)}:{tenant_id}"

    def unsubscribe_rate(self, who: str) -> str:
        """GCRA state of /unsubscribe/ requests: one client address's, or `*` for all."""
        return f"{self.prefix}:rate-unsubscribe:{who}"

    def daily_quota(self, channel: str, tenant_id: str, day: str) -> str:
        """How many `channel` sends of a tenant went through the platform's relay on `day`
        (UTC, YYYYMMDD); expires after the day is over."""
        return f"{self.prefix}:quota:{channel}:{day}:{len(tenant_id)}:{tenant_id}"

    def user_sockets(self, tenant_id: str, user_id: str) -> str:
        """Sorted set of one user's open sockets (every instance), scored by expiry."""
        return f"{self.prefix}:sockets:{len(tenant_id)}:{tenant_id}:{user_id}"

    def tenant_sockets(self, tenant_id: str) -> str:
        """Sorted set of one tenant's open sockets (every instance), scored by expiry."""
        return f"{self.prefix}:sockets:{len(tenant_id)}:{tenant_id}"
