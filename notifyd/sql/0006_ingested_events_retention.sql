-- The housekeeper forgets event ids older than NOTIFYD_EVENT_DEDUPE_TTL, oldest first.
CREATE INDEX ingested_events_received_idx ON ingested_events (received_at);
