-- notifications_provider_message_idx (0002) was meant for provider callbacks, but a Twilio
-- status callback names its notification in its URL and finds the row by primary key, and
-- nothing else looks a row up by provider id. The index only cost: every sent row carries a
-- provider id (an SMTP Message-ID, a Twilio SID, an in-app feed offset), so every delivery's
-- UPDATE wrote one more index entry, on the busiest statement of an in-app send.
DROP INDEX IF EXISTS notifications_provider_message_idx;
