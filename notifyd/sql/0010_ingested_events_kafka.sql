-- Kafka is the third event source (notifyd/ingest/kafka_source.py): its events' rows say so.
ALTER TABLE ingested_events DROP CONSTRAINT ingested_events_source_check;
ALTER TABLE ingested_events
    ADD CONSTRAINT ingested_events_source_check CHECK (source IN ('redis', 'rabbitmq', 'kafka'));
