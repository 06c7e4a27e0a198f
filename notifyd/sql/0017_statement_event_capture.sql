-- The capture of 0013 (the Kafka outbox and the webhook events of notifications) once per
-- statement instead of once per row. The sends of a group commit are one INSERT and the
-- dispatcher's and senders' transitions are one UPDATE per batch; a row trigger ran a
-- PL/pgSQL call, a switch lookup and an endpoint probe for each row of each (about 7 % of
-- rest_ingest's throughput, docs/benchmarks.md). Here each statement runs two set-based
-- statements over its transition tables: what the outbox and webhook_deliveries receive is
-- what 0013 wrote, row for row, in the same transaction.
--
-- Transition tables cannot be combined with a column list (`UPDATE OF status, read_at`), so
-- the update trigger runs for every UPDATE of notifications and keeps only the rows whose
-- status changed or that were read just now (a join of the statement's old and new rows).

DROP TRIGGER notifications_events ON notifications;
DROP FUNCTION delivery_events_capture();

-- the webhook event a notification's status is (NULL: none; `bounced` is fanned out by the
-- bounce listener with the report's reason, notifyd/store/bounces.py)
CREATE FUNCTION notification_status_event(p_status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status
        WHEN 'queued' THEN 'notification.queued'
        WHEN 'sent' THEN 'notification.sent'
        WHEN 'delivered' THEN 'notification.delivered'
        WHEN 'failed' THEN 'notification.failed'
        WHEN 'undelivered' THEN 'notification.failed'
        WHEN 'suppressed' THEN 'notification.suppressed'
    END
$$;

-- a notification event's `data` (the webhook body's), from the row as the change left it
CREATE FUNCTION notification_event_data(n notifications) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'notification_id', n.id,
        'channel', n.channel,
        'status', n.status,
        'recipient', n.recipient,
        'user_id', n.user_id,
        'category', n.category,
        'template_key', n.template_key,
        'critical', n.critical,
        'attempts', n.attempts,
        'last_error', n.last_error,
        'provider_message_id', n.provider_message_id,
        'read_at', n.read_at)
$$;

-- A statement's events. The Kafka outbox takes each row whose status the statement set
-- (every row of an INSERT) while its switch is on; each enabled endpoint of the row's own
-- tenant subscribed to the row's event gets one delivery row, and the sender hears of them
-- at commit. `old_rows` exists in an UPDATE only, so each branch reads its own tables.
CREATE FUNCTION notification_events_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fanned bigint;
    kafka boolean := EXISTS (SELECT 1 FROM delivery_events_switch WHERE enabled);
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF kafka THEN
            INSERT INTO delivery_events_outbox (tenant_id, notification_id, channel, status)
            SELECT n.tenant_id, n.id, n.channel, n.status FROM new_rows n;
        END IF;
        INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type, occurred_at,
                                        data, next_attempt_at, window_start)
        SELECT notifyd_uuid7(), n.tenant_id, e.id, c.event, clock_timestamp(),
               notification_event_data(n), clock_timestamp(), clock_timestamp()
        FROM new_rows n
        CROSS JOIN LATERAL (SELECT notification_status_event(n.status) AS event) c
        JOIN webhook_endpoints e ON e.tenant_id = n.tenant_id
                                AND e.enabled AND c.event = ANY (e.events);
    ELSE
        IF kafka THEN
            INSERT INTO delivery_events_outbox (tenant_id, notification_id, channel, status)
            SELECT n.tenant_id, n.id, n.channel, n.status
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.status IS DISTINCT FROM o.status;
        END IF;
        INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type, occurred_at,
                                        data, next_attempt_at, window_start)
        SELECT notifyd_uuid7(), n.tenant_id, e.id, c.event, clock_timestamp(),
               notification_event_data(n), clock_timestamp(), clock_timestamp()
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        CROSS JOIN LATERAL (SELECT CASE
            WHEN n.status IS DISTINCT FROM o.status THEN notification_status_event(n.status)
            WHEN n.read_at IS NOT NULL AND o.read_at IS NULL THEN 'notification.read'
        END AS event) c
        JOIN webhook_endpoints e ON e.tenant_id = n.tenant_id
                                AND e.enabled AND c.event = ANY (e.events);
    END IF;
    GET DIAGNOSTICS fanned = ROW_COUNT;
    IF fanned > 0 THEN
        PERFORM pg_notify('notifyd_webhooks', '');  -- once per transaction, at commit
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_events_inserted
    AFTER INSERT ON notifications REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notification_events_capture();
CREATE TRIGGER notifications_events_updated
    AFTER UPDATE ON notifications REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notification_events_capture();

-- messages: `message.created`, as 0013's row trigger had it, once per statement
DROP TRIGGER messages_webhook_events ON messages;
DROP FUNCTION webhook_message_created();

CREATE FUNCTION message_events_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fanned bigint;
BEGIN
    INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type, occurred_at,
                                    data, next_attempt_at, window_start)
    SELECT notifyd_uuid7(), m.tenant_id, e.id, 'message.created', clock_timestamp(),
           jsonb_build_object(
               'message_id', m.id,
               'sender_id', m.sender_id,
               'receiver_id', m.receiver_id,
               'room_id', m.room_id,
               'content', m.content,
               'sent_at', m.sent_at),
           clock_timestamp(), clock_timestamp()
    FROM new_rows m
    JOIN webhook_endpoints e ON e.tenant_id = m.tenant_id
                            AND e.enabled AND 'message.created' = ANY (e.events);
    GET DIAGNOSTICS fanned = ROW_COUNT;
    IF fanned > 0 THEN
        PERFORM pg_notify('notifyd_webhooks', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_events_inserted
    AFTER INSERT ON messages REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION message_events_capture();
