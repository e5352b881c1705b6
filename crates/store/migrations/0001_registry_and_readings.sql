-- The device registry and the readings table.
--
-- Identifiers are opaque text chosen by the hospital's systems (an MRN, a
-- UUID): vitalwatch never stores patient names.

CREATE TABLE patients (
    patient_id  text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id   text PRIMARY KEY,
    -- bp_cuff, pulse_oximeter, scale, thermometer, wearable, ...
    kind        text NOT NULL DEFAULT 'unknown',
    -- An inactive device's readings are dead-lettered as unknown_device.
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Which patient had which device when. A device has at most one open
-- assignment; moving it to another patient closes the old one.
CREATE TABLE device_assignments (
    device_id      text NOT NULL REFERENCES devices (device_id),
    patient_id     text NOT NULL REFERENCES patients (patient_id),
    assigned_at    timestamptz NOT NULL DEFAULT now(),
    unassigned_at  timestamptz,
    PRIMARY KEY (device_id, assigned_at),
    CHECK (unassigned_at IS NULL OR unassigned_at >= assigned_at)
);
CREATE UNIQUE INDEX device_assignments_open ON device_assignments (device_id) WHERE unassigned_at IS NULL;

-- One row per stored value. Panels (blood pressure) give one row per
-- component; `component` is '' for scalar metrics.
CREATE TABLE readings (
    time         timestamptz      NOT NULL,  -- device time of measurement (event time)
    patient_id   text             NOT NULL,
    device_id    text             NOT NULL,
    metric       text             NOT NULL,
    component    text             NOT NULL DEFAULT '',
    value        double precision NOT NULL,  -- in `unit`, the catalogue's stored unit
    unit         text             NOT NULL,
    seq          bigint,                     -- the device's batch sequence number
    quality      smallint         NOT NULL DEFAULT 0,  -- bit set: 1 motion artifact, 2 low perfusion, 4 cuff error
    received_at  timestamptz      NOT NULL,  -- when ingest received it
    -- A device measures one metric at one instant once: a redelivered or
    -- retried reading dies here (INSERT ... ON CONFLICT DO NOTHING).
    CONSTRAINT readings_identity UNIQUE (device_id, metric, component, time)
);
CREATE INDEX readings_patient_metric_time ON readings (patient_id, metric, time DESC);
