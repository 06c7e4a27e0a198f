-- Delivery pipeline: rendered content, delivery state, templates, preferences.

ALTER TABLE notifications
    ADD COLUMN html_body            text,
    ADD COLUMN category             text,
    ADD COLUMN critical             boolean NOT NULL DEFAULT false,
    ADD COLUMN locale               text,
    ADD COLUMN provider_message_id  text,
    ADD COLUMN provider_status      text,
    ADD COLUMN claimed_at           timestamptz,
    ADD COLUMN next_attempt_at      timestamptz,
    ADD COLUMN delivered_at         timestamptz;

-- queued → dispatched → sending → sent → delivered | undelivered
--                         ↘ retrying ↗        ↘ failed
-- suppressed: the recipient opted out (and it was not critical)
ALTER TABLE notifications DROP CONSTRAINT notifications_status_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_status_check
    CHECK (status IN ('queued', 'dispatched', 'sending', 'retrying', 'sent', 'delivered',
                      'failed', 'undelivered', 'suppressed', 'cancelled'));

-- the sweeper's scan: work in flight that has not moved for a while
CREATE INDEX notifications_in_flight_idx ON notifications (updated_at)
    WHERE status IN ('queued', 'dispatched', 'sending', 'retrying');
DROP INDEX notifications_queued_idx;
-- provider callbacks find their delivery by the provider's id (Twilio's message SID)
CREATE INDEX notifications_provider_message_idx ON notifications (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Templates per tenant: key × channel × locale ('' is the tenant's default locale).
CREATE TABLE templates (
    tenant_id     text NOT NULL,
    template_key  text NOT NULL,
    channel       text NOT NULL CHECK (channel IN ('email', 'sms', 'in_app')),
    locale        text NOT NULL DEFAULT '',
    subject       text,
    text_body     text NOT NULL,
    html_body     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, template_key, channel, locale)
);

-- Per-user channel and category opt-outs.
CREATE TABLE preferences (
    tenant_id   text NOT NULL,
    user_id     text NOT NULL,
    channels    jsonb NOT NULL DEFAULT '{}'::jsonb,   -- {"email": false, ...}
    categories  jsonb NOT NULL DEFAULT '{}'::jsonb,   -- {"marketing": false, ...}
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

-- the unread count leaves out in-app notifications the recipient opted out of
DROP INDEX notifications_unread_idx;
CREATE INDEX notifications_unread_idx ON notifications (tenant_id, user_id)
    WHERE read_at IS NULL AND channel = 'in_app' AND status <> 'suppressed';
