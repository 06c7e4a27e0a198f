-- Delivery events out (issue 31): each notification's status change is captured into an
-- outbox by a trigger, so it is written in the same transaction as the change itself, by
-- every statement that changes a status now or later. notifyd/ingest/kafka_delivery_events.py
-- publishes the rows to a Kafka topic (keyed by tenant) and deletes them once acknowledged.
-- Capture runs only while the switch is on: the daemon sets it from NOTIFYD_KAFKA_EVENTS_TOPIC
-- at start, so a deployment without the topic writes nothing here.

CREATE TABLE delivery_events_outbox (
    id               bigserial PRIMARY KEY,
    tenant_id        text NOT NULL,
    notification_id  uuid NOT NULL,
    channel          text NOT NULL,
    status           text NOT NULL,
    changed_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE delivery_events_switch (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    enabled   boolean NOT NULL
);
INSERT INTO delivery_events_switch (enabled) VALUES (false);

CREATE FUNCTION delivery_events_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status)
       AND EXISTS (SELECT 1 FROM delivery_events_switch WHERE enabled) THEN
        INSERT INTO delivery_events_outbox (tenant_id, notification_id, channel, status)
        VALUES (NEW.tenant_id, NEW.id, NEW.channel, NEW.status);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_delivery_events
    AFTER INSERT OR UPDATE OF status ON notifications
    FOR EACH ROW EXECUTE FUNCTION delivery_events_capture();
