"""Domain events from other services (a Redis stream, a RabbitMQ queue) turned into
notifications: one schema, deduplicated by (tenant, event id), stored the way a POST is."""
