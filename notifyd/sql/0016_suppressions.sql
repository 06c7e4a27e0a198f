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
