-- Tell listeners (ingest's registry cache) when the registry changes, so a
-- newly registered or moved device is known within moments, not at the next
-- periodic reload.
CREATE FUNCTION vitalwatch_registry_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vitalwatch_registry', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER devices_changed AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION vitalwatch_registry_changed();
CREATE TRIGGER device_assignments_changed AFTER INSERT OR UPDATE OR DELETE ON device_assignments
    FOR EACH STATEMENT EXECUTE FUNCTION vitalwatch_registry_changed();
