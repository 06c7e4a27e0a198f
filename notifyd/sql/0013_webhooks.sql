-- Outbound webhooks (issue 29): a tenant's endpoints, and one delivery row per event and
-- endpoint, written in the transaction of the change that caused it.
--
-- One capture point for every event out: the triggers below decide which changes are events
-- (a notification's status or read mark, a message, a reminder firing, a workflow step's
-- outcome). For notifications the trigger of 0011 is replaced by one function that feeds both
-- outboxes: `delivery_events_outbox` (the Kafka topic, while its switch is on) and
-- `webhook_deliveries` (one row per enabled endpoint of the tenant subscribed to the event).
-- A change that commits has its deliveries; one that rolls back has none. A tenant without an
-- endpoint costs one index probe of `webhook_endpoints` per event-worthy change.

CREATE TABLE webhook_endpoints (
    id                   uuid PRIMARY KEY,
    tenant_id            text NOT NULL,
    url                  text NOT NULL,
    description          text NOT NULL DEFAULT '',
    events               text[] NOT NULL,
    -- `whsec_…`, sealed with NOTIFYD_TENANT_SECRET_KEY (notifyd/secretbox.py): never in clear
    secret_enc           text NOT NULL,
    -- the secret before the last rotation: requests are signed with both until then
    previous_secret_enc  text,
    previous_until       timestamptz,
    enabled              boolean NOT NULL DEFAULT true,
    disabled_reason      text,
    -- the last 2xx (to the second), and when it was created or last turned back on: an
    -- endpoint that answered neither since NOTIFYD_WEBHOOK_RETRY_FOR is disabled
    answered_at          timestamptz,
    enabled_at           timestamptz NOT NULL DEFAULT now(),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant_idx ON webhook_endpoints (tenant_id, id);

-- one event for one endpoint; `id` is the `webhook-id` header, the same on every attempt
CREATE TABLE webhook_deliveries (
    id                uuid PRIMARY KEY,
    tenant_id         text NOT NULL,
    endpoint_id       uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_type        text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    data              jsonb NOT NULL,
    -- pending → sending (claimed: next_attempt_at is the lease's end) → succeeded | pending
    -- (a retry, due at next_attempt_at) | failed (retried for NOTIFYD_WEBHOOK_RETRY_FOR)
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'sending', 'succeeded', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL,
    -- retries end NOTIFYD_WEBHOOK_RETRY_FOR after this (the event, or the last replay)
    window_start      timestamptz NOT NULL,
    last_status_code  integer,
    last_error        text,
    last_latency_ms   integer,
    attempt_log       jsonb NOT NULL DEFAULT '[]',
    done_at           timestamptz
);
-- the sender's claim, tenant by tenant (so one tenant's backlog never hides another's rows)
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (tenant_id, next_attempt_at)
    WHERE status IN ('pending', 'sending');
-- when the next one falls due, whoever's it is
CREATE INDEX webhook_deliveries_next_idx ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'sending');
-- an endpoint's deliveries, newest first
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id DESC);

-- a UUIDv7 (time-ordered, as every id notifyd makes): 48 bits of milliseconds, then random
CREATE FUNCTION notifyd_uuid7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
            PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                FROM 3)
            FROM 1 FOR 6), 52, 1), 53, 1),
        'hex')::uuid
$$;

-- whether any enabled endpoint of the tenant wants this event (one index probe)
CREATE FUNCTION webhook_wanted(p_tenant text, p_type text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM webhook_endpoints
        WHERE tenant_id = p_tenant AND enabled AND p_type = ANY (events)
    )
$$;

-- one delivery row per endpoint that wants it; the sender hears of them at commit
CREATE FUNCTION webhook_fan_out(p_tenant text, p_type text, p_data jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries
        (id, tenant_id, endpoint_id, event_type, occurred_at, data, next_attempt_at, window_start)
    SELECT notifyd_uuid7(), p_tenant, e.id, p_type, clock_timestamp(), p_data,
           clock_timestamp(), clock_timestamp()
    FROM webhook_endpoints e
    WHERE e.tenant_id = p_tenant AND e.enabled AND p_type = ANY (e.events);
    IF FOUND THEN
        -- delivered on commit, once per transaction (same channel and payload)
        PERFORM pg_notify('notifyd_webhooks', '');
    END IF;
END
$$;

-- notifications: the Kafka outbox as in 0011, and the webhook events
CREATE OR REPLACE FUNCTION delivery_events_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event text;
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        IF EXISTS (SELECT 1 FROM delivery_events_switch WHERE enabled) THEN
            INSERT INTO delivery_events_outbox (tenant_id, notification_id, channel, status)
            VALUES (NEW.tenant_id, NEW.id, NEW.channel, NEW.status);
        END IF;
        event := CASE NEW.status
            WHEN 'queued' THEN 'notification.queued'
            WHEN 'sent' THEN 'notification.sent'
            WHEN 'delivered' THEN 'notification.delivered'
            WHEN 'failed' THEN 'notification.failed'
            WHEN 'undelivered' THEN 'notification.failed'
            WHEN 'suppressed' THEN 'notification.suppressed'
        END;
    ELSIF NEW.read_at IS NOT NULL AND OLD.read_at IS NULL THEN
        event := 'notification.read';
    END IF;
    IF event IS NOT NULL AND webhook_wanted(NEW.tenant_id, event) THEN
        PERFORM webhook_fan_out(NEW.tenant_id, event, jsonb_build_object(
            'notification_id', NEW.id,
            'channel', NEW.channel,
            'status', NEW.status,
            'recipient', NEW.recipient,
            'user_id', NEW.user_id,
            'category', NEW.category,
            'template_key', NEW.template_key,
            'critical', NEW.critical,
            'attempts', NEW.attempts,
            'last_error', NEW.last_error,
            'provider_message_id', NEW.provider_message_id,
            'read_at', NEW.read_at));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER notifications_delivery_events ON notifications;
CREATE TRIGGER notifications_events
    AFTER INSERT OR UPDATE OF status, read_at ON notifications
    FOR EACH ROW EXECUTE FUNCTION delivery_events_capture();

CREATE FUNCTION webhook_message_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF webhook_wanted(NEW.tenant_id, 'message.created') THEN
        PERFORM webhook_fan_out(NEW.tenant_id, 'message.created', jsonb_build_object(
            'message_id', NEW.id,
            'sender_id', NEW.sender_id,
            'receiver_id', NEW.receiver_id,
            'room_id', NEW.room_id,
            'content', NEW.content,
            'sent_at', NEW.sent_at));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_webhook_events
    AFTER INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION webhook_message_created();

CREATE FUNCTION webhook_reminder_fired() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'fired' AND OLD.status IS DISTINCT FROM 'fired'
       AND webhook_wanted(NEW.tenant_id, 'reminder.fired') THEN
        PERFORM webhook_fan_out(NEW.tenant_id, 'reminder.fired', jsonb_build_object(
            'reminder_id', NEW.id,
            'application_id', NEW.application_id,
            'candidate_id', NEW.candidate_id,
            'employer_id', NEW.employer_id,
            'interview_time', NEW.interview_time,
            'reminder_time', NEW.reminder_time,
            'notification_ids', to_jsonb(NEW.notification_ids),
            'fired_at', NEW.fired_at));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER interview_reminders_webhook_events
    AFTER UPDATE OF status ON interview_reminders
    FOR EACH ROW EXECUTE FUNCTION webhook_reminder_fired();

-- a step's outcome: it left `pending` (sent, skipped, failed, cancelled), or was born decided
-- (throttled, or skipped at the trigger)
CREATE FUNCTION webhook_workflow_step() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    run record;
BEGIN
    IF NEW.status <> 'pending'
       AND (TG_OP = 'INSERT' OR OLD.status = 'pending')
       AND webhook_wanted(NEW.tenant_id, 'workflow.step') THEN
        SELECT workflow_key, recipient INTO run FROM workflow_runs WHERE id = NEW.run_id;
        PERFORM webhook_fan_out(NEW.tenant_id, 'workflow.step', jsonb_build_object(
            'run_id', NEW.run_id,
            'workflow_key', run.workflow_key,
            'recipient', run.recipient,
            'position', NEW.position,
            'channel', NEW.channel,
            'template_key', NEW.template_key,
            'status', NEW.status,
            'reason', NEW.reason,
            'notification_ids', to_jsonb(NEW.notification_ids)));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflow_steps_webhook_events
    AFTER INSERT OR UPDATE OF status ON workflow_steps
    FOR EACH ROW EXECUTE FUNCTION webhook_workflow_step();
