-- Care teams, per-patient threshold overrides, the alert lifecycle, and the
-- audit log. The API (scoping, audit) and the rules engine (thresholds,
-- alerts) build on these tables.

-- A care team looks after a panel of patients; its members are the OIDC
-- subjects (`sub` claim) of the nurses and clinicians in it.
CREATE TABLE care_teams (
    team_id     text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE care_team_patients (
    team_id     text NOT NULL REFERENCES care_teams (team_id) ON DELETE CASCADE,
    patient_id  text NOT NULL REFERENCES patients (patient_id),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, patient_id)
);
CREATE INDEX care_team_patients_patient ON care_team_patients (patient_id);

CREATE TABLE care_team_members (
    team_id     text NOT NULL REFERENCES care_teams (team_id) ON DELETE CASCADE,
    subject     text NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, subject)
);
CREATE INDEX care_team_members_subject ON care_team_members (subject);

-- Per-patient overrides of a configured rule's parameters (a nurse lowers a
-- COPD patient's SpO2 limit to 88). `params` holds only what is overridden;
-- the rule's configured defaults apply to the rest.
CREATE TABLE thresholds (
    patient_id  text NOT NULL REFERENCES patients (patient_id),
    rule        text NOT NULL,
    params      jsonb NOT NULL CHECK (jsonb_typeof(params) = 'object'),
    reason      text,
    set_by      text NOT NULL,
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, rule)
);

-- One row per alert episode. The id is deterministic (a hash of patient,
-- rule and episode start), so a replay after a crash inserts nothing new.
CREATE TABLE alerts (
    alert_id          text PRIMARY KEY,
    patient_id        text NOT NULL,
    rule              text NOT NULL,
    severity          text NOT NULL CHECK (severity IN ('low', 'low_medium', 'medium', 'high')),
    state             text NOT NULL CHECK (state IN ('raised', 'acknowledged', 'resolved')),
    escalation_level  smallint NOT NULL DEFAULT 0,
    episode_start     timestamptz NOT NULL,  -- event time of the first reading of the episode
    raised_at         timestamptz NOT NULL,  -- event time the rule's condition was met
    opened_at         timestamptz NOT NULL DEFAULT now(),  -- wall clock: when nurses were told (escalation counts from here)
    updated_at        timestamptz NOT NULL,
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    resolved_at       timestamptz,
    resolved_by       text,                  -- NULL when it cleared on its own
    news2_score       smallint,
    detail            jsonb NOT NULL DEFAULT '{}'
);
-- A persisting condition updates its open alert, never opens a second.
CREATE UNIQUE INDEX alerts_one_open ON alerts (patient_id, rule) WHERE state <> 'resolved';
CREATE INDEX alerts_patient_raised ON alerts (patient_id, raised_at DESC);
CREATE INDEX alerts_open_opened ON alerts (opened_at) WHERE state <> 'resolved';

-- Every lifecycle change of an alert, in order.
CREATE TABLE alert_events (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order of the changes
    alert_id          text NOT NULL REFERENCES alerts (alert_id),
    at                timestamptz NOT NULL,
    -- 'updated': the engine changed the open alert (a NEWS2 risk moved).
    state             text NOT NULL CHECK (state IN ('raised', 'updated', 'escalated', 'acknowledged', 'resolved')),
    escalation_level  smallint NOT NULL DEFAULT 0,
    severity          text CHECK (severity IN ('low', 'low_medium', 'medium', 'high')),
    actor             text,                  -- who acted, NULL for the engine
    note              text,
    -- Outbox: set once the change is on rpm.alerts.v1. A change committed
    -- here but not yet published (a crash in between) is published after
    -- restart, so no lifecycle change is lost.
    published_at      timestamptz
);
CREATE INDEX alert_events_alert ON alert_events (alert_id, id);
CREATE INDEX alert_events_unpublished ON alert_events (at) WHERE published_at IS NULL;

-- Who read or changed which patient's data, when, from where, and whether
-- it was allowed. Append-only: updates and deletes are refused.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,               -- OIDC subject, or 'anonymous'
    action      text NOT NULL,               -- e.g. 'vitals.read', 'alert.acknowledge'
    patient_id  text,
    request_id  text,
    source      text,                        -- client address
    outcome     text NOT NULL CHECK (outcome IN ('allowed', 'denied', 'failed')),
    detail      text
);
CREATE INDEX audit_log_patient_at ON audit_log (patient_id, at);
CREATE INDEX audit_log_actor_at ON audit_log (actor, at);

CREATE FUNCTION vitalwatch_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION vitalwatch_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION vitalwatch_audit_append_only();
