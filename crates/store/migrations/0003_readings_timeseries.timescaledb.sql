-- Readings as a time-series table, TimescaleDB layout: a hypertable on
-- `time`, hierarchical continuous aggregates, and compression. (The plain
-- PostgreSQL layout is in 0003_readings_timeseries.native.sql; exactly one
-- of the two runs.) The chunk width, compression age, retention and the
-- refresh policies are applied from configuration at every start-up
-- (`vitalwatch_store::storage::apply_policies`).
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
);
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'));

-- Compressed chunks keep one segment per patient and metric, the shape of
-- every trend query, ordered by the rest of the unique key.
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'patient_id, metric',
    timescaledb.compress_orderby = 'time DESC, component, device_id'
);

-- Continuous aggregates keep min, max, avg, sum and count per patient,
-- metric and component; sum and count let a coarser bucket be built exactly
-- from finer ones (avg = sum / count), and avg is there for direct readers. Each
-- level is built from the one below. They are real-time
-- (materialized_only = false): the part newer than the last refresh is
-- computed from the level below at query time, so the newest readings are
-- on every chart.
CREATE MATERIALIZED VIEW readings_5m WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '5 minutes', time) AS bucket, patient_id, metric, component,
       min(value) AS min, max(value) AS max, avg(value) AS avg, sum(value) AS sum, count(*) AS count
  FROM readings
 GROUP BY 1, 2, 3, 4
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1h WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', bucket) AS bucket, patient_id, metric, component,
       min(min) AS min, max(max) AS max, sum(sum) / sum(count) AS avg, sum(sum) AS sum, sum(count)::bigint AS count
  FROM readings_5m
 GROUP BY 1, 2, 3, 4
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1d WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', bucket) AS bucket, patient_id, metric, component,
       min(min) AS min, max(max) AS max, sum(sum) / sum(count) AS avg, sum(sum) AS sum, sum(count)::bigint AS count
  FROM readings_1h
 GROUP BY 1, 2, 3, 4
WITH NO DATA;

-- Move the rows of the old table over. The aggregates are refreshed over
-- all history once, outside this transaction, by the next `migrate`
-- (`storage::apply_policies`): the refresh policies look back 100 days only.
INSERT INTO readings (time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at)
SELECT time, patient_id, device_id, metric, component, value, unit, seq, quality, received_at FROM readings_v1;
DROP TABLE readings_v1;
