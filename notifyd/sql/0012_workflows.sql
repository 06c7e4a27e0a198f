-- Workflows (issue 27): recipients, workflow definitions, runs and their steps.
-- Every table is keyed by tenant; a step row is the truth the timer wheel is rebuilt from.

CREATE TABLE recipients (
    tenant_id   text NOT NULL,
    user_id     text NOT NULL,
    email       text,
    phone       text,
    timezone    text,
    locale      text,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE workflows (
    tenant_id     text NOT NULL,
    workflow_key  text NOT NULL,
    definition    jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, workflow_key)
);

CREATE TABLE workflow_runs (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL,
    workflow_key  text NOT NULL,
    recipient     text NOT NULL,
    -- the definition as it was when triggered: a later PUT does not change a running run
    definition    jsonb NOT NULL,
    data          jsonb NOT NULL DEFAULT '{}',
    critical      boolean NOT NULL DEFAULT false,
    cancel_key    text,
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'cancelled', 'throttled')),
    created_by    text NOT NULL,
    starts_at     timestamptz NOT NULL,
    -- a digest run: the value of data[key] it merges, until when it takes more triggers,
    -- how many it holds; closed once its first step fires (no item is added after that)
    digest_key        text,
    digest_closes_at  timestamptz,
    digest_items      integer NOT NULL DEFAULT 0,
    digest_closed     boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workflow_runs_recipient_idx ON workflow_runs (tenant_id, recipient, id DESC);
CREATE INDEX workflow_runs_cancel_idx ON workflow_runs (tenant_id, workflow_key, cancel_key)
    WHERE cancel_key IS NOT NULL;

CREATE INDEX workflow_runs_open_digest_idx
    ON workflow_runs (tenant_id, workflow_key, recipient, digest_key)
    WHERE digest_key IS NOT NULL AND NOT digest_closed;

-- each trigger merged into a digest run: its data, in order (the first trigger's too)
CREATE TABLE workflow_run_items (
    run_id      uuid NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    tenant_id   text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE workflow_steps (
    run_id            uuid NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    position          smallint NOT NULL,
    tenant_id         text NOT NULL,
    channel           text NOT NULL CHECK (channel IN ('email', 'sms', 'in_app')),
    template_key      text NOT NULL,
    unless            text[] NOT NULL DEFAULT '{}',
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'sent', 'skipped', 'cancelled',
                                        'throttled', 'failed')),
    reason            text,
    due_at            timestamptz NOT NULL,
    done_at           timestamptz,
    lateness_ms       integer,
    notification_ids  uuid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, position)
);

-- the wheel's rebuild and the sweeper's overdue check
CREATE INDEX workflow_steps_due_idx ON workflow_steps (due_at, run_id, position)
    WHERE status = 'pending';
