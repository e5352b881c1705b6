-- Readings as a time-series table, plain PostgreSQL layout: range
-- partitions of one UTC day each. (The TimescaleDB layout is in
-- 0003_readings_timeseries.timescaledb.sql; exactly one of the two runs.)
--
-- The table of migration 0001 is replaced: its rows are moved over.

ALTER TABLE readings RENAME TO readings_v1;
ALTER TABLE readings_v1 RENAME CONSTRAINT readings_identity TO readings_v1_identity;
ALTER INDEX readings_patient_metric_time RENAME TO readings_v1_patient_metric_time;

CREATE TABLE readings (
    time         timestamptz      NOT NULL,  -- device time of measurement (event time)
    patient_id   text             NOT NULL,
    device_id    text             NOT NULL,
    metric       text             NOT NULL,
    component    text             NOT NULL DEFAULT '',  -- '' for scalar metrics
    value        double precision NOT NULL,  -- in `unit`, the catalogue's stored unit
    unit         text             NOT NULL,
    seq          bigint,                     -- the device's batch sequence number
    quality      smallint         NOT NULL DEFAULT 0,  -- bit set: 1 motion artifact, 2 low perfusion, 4 cuff error
    received_at  timestamptz      NOT NULL,  -- when ingest received it
    -- A device measures one metric at one instant once: a redelivered or
    -- retried reading dies here (INSERT ... ON CONFLICT DO NOTHING). The
    -- key leads with (patient_id, metric, time), so the same index serves
    -- every trend query: one index to maintain per row, not two, which
    -- doubles write throughput (see README, benchmarks).
    CONSTRAINT readings_identity UNIQUE (patient_id, metric, time, component, device_id)
) PARTITION BY RANGE (time);

-- Creates the missing partitions of the given UTC days; returns how many
-- it created. Concurrent callers are serialized by a lock on `readings`
-- that conflicts with itself and DDL but not with reads or writes, so two
-- writers never race to create the same partition.
CREATE FUNCTION vitalwatch_ensure_partitions(days date[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day     date;
    name    text;
    created integer := 0;
BEGIN
    FOR day IN SELECT DISTINCT d FROM unnest(days) AS d WHERE d IS NOT NULL ORDER BY 1
    LOOP
        name := 'readings_p' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(quote_ident(name)) IS NOT NULL;
        -- Taking the lock also makes partitions committed meanwhile visible.
        LOCK TABLE readings IN SHARE UPDATE EXCLUSIVE MODE;
        CONTINUE WHEN to_regclass(quote_ident(name)) IS NOT NULL;
        -- Created apart, then attached: ATTACH PARTITION takes only SHARE
        -- UPDATE EXCLUSIVE on `readings`, where CREATE TABLE ... PARTITION OF
        -- would take ACCESS EXCLUSIVE and block every read and write.
        EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS)', name);
        EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        created := created + 1;
    END LOOP;
    RETURN created;
END;
$$;

-- The same for every UTC day from from_ts to to_ts.
CREATE FUNCTION vitalwatch_ensure_partitions(from_ts timestamptz, to_ts timestamptz) RETURNS integer
LANGUAGE sql AS $$
    SELECT vitalwatch_ensure_partitions(array_agg(d::date))
      FROM generate_series((from_ts AT TIME ZONE 'UTC')::date, (to_ts AT TIME ZONE 'UTC')::date, interval '1 day') AS d
$$;

-- Retention: drops the day partitions that end at or before `cutoff` and
-- returns their names. (Dropping a partition briefly locks `readings`
-- exclusively; retention runs hourly.)
CREATE FUNCTION vitalwatch_drop_partitions_before(cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname::text
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'readings'::regclass
           AND c.relname ~ '^readings_p[0-9]{8}$'
           AND ((to_date(substr(c.relname, 11), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC') <= cutoff
         ORDER BY 1
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I', part);
        RETURN NEXT part;
    END LOOP;
END;
$$;

-- Move the rows of the old table over.
SELECT vitalwatch_ensure_partitions(array_agg(DISTINCT (time AT TIME ZONE 'UTC')::date)) FROM readings_v1;
INSERT INTO readings (time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at)
SELECT time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at FROM readings_v1;
DROP TABLE readings_v1;
