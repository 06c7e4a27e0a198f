-- Domain events other services publish (Redis stream, RabbitMQ), one row per event accepted.
-- The primary key is the deduplication: a replayed or twice-published event finds its row
-- (INSERT ... ON CONFLICT DO NOTHING) and is acknowledged without making notifications again.
-- The row is written in the same transaction as the notifications it made.

CREATE TABLE ingested_events (
    tenant_id         text NOT NULL,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    source            text NOT NULL CHECK (source IN ('redis', 'rabbitmq')),
    received_at       timestamptz NOT NULL DEFAULT now(),
    notification_ids  uuid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, event_id)
);
