-- Per-patient threshold overrides take effect in the running engines.
--
-- Every change to `thresholds` (through the API, or by hand) appends the
-- patient to `threshold_changes` and notifies `vitalwatch_thresholds`; an
-- alerts engine reads the changes after its own cursor and rebuilds those
-- patients from the store with their new overrides. A missed notification
-- loses nothing: the engine reads from its cursor on every wake and after
-- every reconnection.
CREATE TABLE threshold_changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    patient_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION vitalwatch_threshold_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- clock_timestamp(), not now(): the moment of the change, not of the
    -- start of its transaction, so the readers' five-minute look-back
    -- covers transactions that stay open a while after it.
    INSERT INTO threshold_changes (patient_id, at)
    VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.patient_id ELSE NEW.patient_id END, clock_timestamp());
    PERFORM pg_notify('vitalwatch_thresholds', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER thresholds_changed AFTER INSERT OR UPDATE OR DELETE ON thresholds
    FOR EACH ROW EXECUTE FUNCTION vitalwatch_threshold_changed();
