-- Per-tenant overrides of the rate limits, daily quotas and socket caps (docs/limits.md),
-- set by a platform operator with `notifyd limits set`. One row per overridden limit; a
-- tenant without rows has the settings' defaults. Every instance reads the whole table
-- every NOTIFYD_LIMITS_REFRESH seconds: it holds only the exceptions, so it stays small.
CREATE TABLE tenant_limits (
    tenant_id text NOT NULL,
    name text NOT NULL,
    value double precision NOT NULL CHECK (value >= 0),
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);
