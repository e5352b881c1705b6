-- Delivering alert changes: the outbox relay publishes `alert_events` in id
-- order, woken by a notification on every insert; webhooks keep a cursor
-- and a log of every delivery attempt.

-- One notification per inserting statement (payload-free: listeners read
-- the table from their own cursor, so a missed notification loses nothing).
CREATE FUNCTION vitalwatch_alert_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vitalwatch_alert_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER alert_events_notify AFTER INSERT ON alert_events
    FOR EACH STATEMENT EXECUTE FUNCTION vitalwatch_alert_events_notify();

-- The relay reads the unpublished events in id order.
DROP INDEX alert_events_unpublished;
CREATE INDEX alert_events_unpublished ON alert_events (id) WHERE published_at IS NULL;

-- How far each configured webhook endpoint has been delivered.
CREATE TABLE webhook_cursors (
    endpoint       text PRIMARY KEY,
    last_event_id  bigint NOT NULL
);

-- Every delivery attempt, successful or not.
CREATE TABLE webhook_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint     text NOT NULL,
    event_id     bigint NOT NULL REFERENCES alert_events (id),
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'failed')),
    http_status  integer,
    error        text
);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
