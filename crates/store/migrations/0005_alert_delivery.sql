-- Delivering alert changes.
--
-- `id` (an identity) orders changes by when they were inserted, not by when
-- they were committed: a reader that follows ids can pass a change whose
-- transaction commits late. So committed changes are given `seq`, in id
-- order, by one sequencer at a time (an advisory lock; whichever process
-- reads next runs it), and readers (the relay, the API's streams, webhooks)
-- follow `seq`: a change is seen only once everything before it is.
-- Listeners are woken by a notification on every insert and sequencing.

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

ALTER TABLE alert_events ADD COLUMN seq bigint;
CREATE UNIQUE INDEX alert_events_seq ON alert_events (seq);
CREATE INDEX alert_events_unsequenced ON alert_events (id) WHERE seq IS NULL;

-- The relay reads the unpublished events in seq order.
DROP INDEX alert_events_unpublished;
CREATE INDEX alert_events_unpublished ON alert_events (seq) WHERE published_at IS NULL;

-- How far each configured webhook endpoint has been delivered (a seq).
CREATE TABLE webhook_cursors (
    endpoint  text PRIMARY KEY,
    last_seq  bigint NOT NULL
);

-- Every delivery attempt, successful or not.
CREATE TABLE webhook_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint     text NOT NULL,
    event_id     bigint NOT NULL REFERENCES alert_events (id),
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    -- 'abandoned': refused for good (a 4xx other than 408 and 429, three
    -- times): the change is skipped so later ones still reach the endpoint.
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'abandoned')),
    http_status  integer,
    error        text
);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
