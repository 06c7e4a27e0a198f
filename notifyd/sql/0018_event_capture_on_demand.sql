-- Event capture only while something listens. The capture triggers (0013, 0017) cost every
-- write of a notification, message, reminder or workflow step whether or not anything reads
-- what they capture: filling a statement's transition tables alone is about 15 µs of
-- PostgreSQL per REST send (docs/benchmarks.md), in a deployment with no webhook endpoint
-- and the Kafka outbox off. Here each table's capture triggers are enabled while some
-- consumer of its events exists, and disabled otherwise:
--
-- - notifications: the Kafka outbox is on, or an enabled endpoint subscribes to a
--   `notification.*` event;
-- - messages, interview_reminders, workflow_steps: an enabled endpoint subscribes to
--   `message.created`, `reminder.fired`, `workflow.step`.
--
-- Enabling is synchronous: a statement trigger on webhook_endpoints (and on the Kafka switch)
-- enables what the change needs before its transaction commits, so every write that commits
-- after the endpoint is captured, as before. Disabling is lazy: only the housekeeper turns
-- capture off (`event_capture_sync(true)`, under a short lock timeout), once per round. The
-- ALTER TABLE that switches a trigger waits for the writes in flight on its table and holds
-- the next ones meanwhile; done on every change of endpoints, a tenant creating and deleting
-- its only endpoint in a loop could stall every tenant's sends, so it happens at most once
-- per housekeeping round.
--
-- Changes of capture are serialised on the Kafka switch's one row: each takes it FOR UPDATE
-- and then reads what is committed (a new snapshot per statement), so two transactions
-- changing endpoints at once cannot leave capture off while an endpoint needs it.

-- each table's capture triggers and whether anything wants them now
CREATE FUNCTION event_capture_plan()
RETURNS TABLE (table_name regclass, trigger_names text[], wanted boolean)
LANGUAGE sql STABLE AS $$
    SELECT 'notifications'::regclass,
           ARRAY['notifications_events_inserted', 'notifications_events_updated'],
           coalesce((SELECT enabled FROM delivery_events_switch), false)
           OR EXISTS (SELECT 1 FROM webhook_endpoints e, unnest(e.events) AS t (event_type)
                      WHERE e.enabled AND t.event_type LIKE 'notification.%')
    UNION ALL
    SELECT 'messages'::regclass, ARRAY['messages_events_inserted'],
           EXISTS (SELECT 1 FROM webhook_endpoints e
                   WHERE e.enabled AND 'message.created' = ANY (e.events))
    UNION ALL
    SELECT 'interview_reminders'::regclass, ARRAY['interview_reminders_webhook_events'],
           EXISTS (SELECT 1 FROM webhook_endpoints e
                   WHERE e.enabled AND 'reminder.fired' = ANY (e.events))
    UNION ALL
    SELECT 'workflow_steps'::regclass, ARRAY['workflow_steps_webhook_events'],
           EXISTS (SELECT 1 FROM webhook_endpoints e
                   WHERE e.enabled AND 'workflow.step' = ANY (e.events))
$$;

-- Brings capture in line with the plan: enables what is wanted and, with `p_disable`, also
-- disables what is not. Returns how many triggers it switched.
CREATE FUNCTION event_capture_sync(p_disable boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    plan record;
    trigger_name text;
    enabled boolean;
    switched integer := 0;
BEGIN
    PERFORM 1 FROM delivery_events_switch FOR UPDATE;  -- one change of capture at a time
    FOR plan IN SELECT * FROM event_capture_plan() LOOP
        CONTINUE WHEN NOT (plan.wanted OR p_disable);
        FOREACH trigger_name IN ARRAY plan.trigger_names LOOP
            SELECT t.tgenabled <> 'D' INTO enabled
            FROM pg_trigger t WHERE t.tgrelid = plan.table_name AND t.tgname = trigger_name;
            CONTINUE WHEN enabled = plan.wanted;
            EXECUTE format('ALTER TABLE %s %s TRIGGER %I', plan.table_name,
                           CASE WHEN plan.wanted THEN 'ENABLE' ELSE 'DISABLE' END, trigger_name);
            switched := switched + 1;
        END LOOP;
    END LOOP;
    RETURN switched;
END
$$;

CREATE FUNCTION event_capture_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM event_capture_sync(false);
    RETURN NULL;
END
$$;

CREATE TRIGGER webhook_endpoints_capture
    AFTER INSERT OR UPDATE OF enabled, events ON webhook_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION event_capture_follow();
CREATE TRIGGER delivery_events_switch_capture
    AFTER UPDATE ON delivery_events_switch
    FOR EACH STATEMENT EXECUTE FUNCTION event_capture_follow();

SELECT event_capture_sync(true);
