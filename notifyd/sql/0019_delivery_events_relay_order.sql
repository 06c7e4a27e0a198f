-- Delivery events in commit order (issue 31's per-tenant order). The outbox's `id` is taken
-- when a row is inserted, not when its transaction commits: two transactions of one tenant
-- can commit in the opposite order to their ids, and a relay that published `ORDER BY id`
-- had published the higher id before the lower one became visible. A consumer that keeps
-- the highest `event_id` it has seen (the usual way to drop redeliveries) then drops the
-- late, lower one.
--
-- So the published `event_id` is no longer the outbox id but `seq`, which the relay (one at a
-- time, under its advisory lock) assigns to rows it can already see, in one statement with
-- the bump of its counter: a row that commits later gets a higher `seq` than every row
-- assigned before it, whatever its id. Within one batch, `seq` follows `id`, which for one
-- notification is the order of its changes (each change waits for the previous one's row
-- lock, so it inserts its row after that one committed). A row keeps its `seq` until Kafka
-- acknowledged it and it is deleted: a relay that crashes in between publishes it again
-- with the same `event_id`.

ALTER TABLE delivery_events_outbox ADD COLUMN seq bigint;

-- rows assigned but not yet acknowledged, read back in `seq` order after a crash
CREATE UNIQUE INDEX delivery_events_outbox_seq_idx
    ON delivery_events_outbox (seq) WHERE seq IS NOT NULL;

CREATE TABLE delivery_events_relay (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_seq  bigint NOT NULL
);
-- continues above every id published before: a consumer's "highest seen" keeps working
INSERT INTO delivery_events_relay (last_seq)
SELECT last_value FROM delivery_events_outbox_id_seq;
