-- Issue 29: a tenant's suppression list. An address (email, lower-cased; SMS, E.164) that
-- must not be sent to on a channel, for every category (category '') or for one (a
-- complaint, an unsubscribe without a user id). The dispatcher reads it with the batch's
-- rows (one LEFT JOIN LATERAL per row on the unique index below); a send it matches ends
-- `suppressed` with the entry's reason, before any relay or Twilio is called.
-- (0014 and 0015 are taken by work on other branches.)
CREATE TABLE suppressions (
    id              uuid PRIMARY KEY DEFAULT notifyd_uuid7(),
    tenant_id       text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('email', 'sms')),
    address         text NOT NULL CHECK (length(address) BETWEEN 1 AND 320),
    category        text NOT NULL DEFAULT '' CHECK (length(category) <= 64),
    reason          text NOT NULL
                    CHECK (reason IN ('hard_bounce', 'smtp_refused', 'sms_opt_out',
                                      'complaint', 'unsubscribe')),
    -- where it came from, in words: the relay's or Twilio's answer, bounded
    source          text NOT NULL CHECK (length(source) <= 500),
    notification_id uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, channel, address, category)
);

-- GET /suppressions/: a tenant's entries, newest first, by id cursor
CREATE INDEX suppressions_list_idx ON suppressions (tenant_id, id DESC);

-- `bounced`: a DSN (RFC 3464) reported a permanent failure after the relay had said 250
-- (the bounce listener, issue 29). Added NOT VALID, then validated: the check of existing
-- rows takes no lock that stops writes.
ALTER TABLE notifications DROP CONSTRAINT notifications_status_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_status_check
    CHECK (status IN ('queued', 'dispatched', 'sending', 'retrying', 'sent', 'delivered',
                      'failed', 'undelivered', 'suppressed', 'cancelled', 'bounced'))
    NOT VALID;
ALTER TABLE notifications VALIDATE CONSTRAINT notifications_status_check;
