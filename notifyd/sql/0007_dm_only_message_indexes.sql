-- The indexes behind the 1-on-1 queries (a user's messages, a conversation, unread counts)
-- hold 1-on-1 messages only. A group-room message is found by its room (messages_room_idx);
-- every index it skips is one index insert fewer per chat message, which in a busy room was
-- most of PostgreSQL's work per message.
DROP INDEX messages_sender_idx;
CREATE INDEX messages_sender_idx ON messages (tenant_id, sender_id, id DESC)
    WHERE receiver_id IS NOT NULL;
DROP INDEX messages_receiver_idx;
CREATE INDEX messages_receiver_idx ON messages (tenant_id, receiver_id, id DESC)
    WHERE receiver_id IS NOT NULL;
DROP INDEX messages_pair_idx;
CREATE INDEX messages_pair_idx ON messages
    (tenant_id, LEAST(sender_id, receiver_id), GREATEST(sender_id, receiver_id), id DESC)
    WHERE receiver_id IS NOT NULL;
DROP INDEX messages_unread_idx;
CREATE INDEX messages_unread_idx ON messages (tenant_id, receiver_id)
    WHERE read_at IS NULL AND receiver_id IS NOT NULL;
