-- Engage audiences (and journey steps) seen in messages or imported.
CREATE TABLE audiences (
    key            TEXT PRIMARY KEY,
    -- the user trait sent to Schematic: the key snake_cased
    trait_name     TEXT NOT NULL,
    first_seen_at  TEXT NOT NULL,
    last_synced_at TEXT
);

-- Per (audience, user): the desired state (from Engage messages and
-- snapshots) and the state last enqueued to Schematic by a sync run.
CREATE TABLE audience_members (
    audience_key TEXT NOT NULL REFERENCES audiences (key),
    user_id      TEXT NOT NULL,
    desired      INTEGER NOT NULL CHECK (desired = 0 OR desired = 1),
    desired_at   TEXT NOT NULL,
    synced       INTEGER CHECK (synced = 0 OR synced = 1),
    synced_at    TEXT,
    PRIMARY KEY (audience_key, user_id)
) WITHOUT ROWID;

-- the pairs a sync has to send: members not synced as members, and synced
-- members who left; the diff walks only this index. It covers the columns the
-- diff reads (desired, synced), so walking it never visits the table, and the
-- diff queries name it (INDEXED BY): without statistics the planner would
-- otherwise prefer the primary key and scan every pair of the audience.
CREATE INDEX audience_members_changed ON audience_members (audience_key, user_id, desired, synced)
    WHERE (desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1);

-- one row per sync run and audience
CREATE TABLE sync_runs (
    id          INTEGER PRIMARY KEY,
    audience    TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    added       INTEGER NOT NULL DEFAULT 0,
    removed     INTEGER NOT NULL DEFAULT 0,
    enqueued    INTEGER NOT NULL DEFAULT 0,
    full        INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    -- the names SPEC 5 uses, for people at the sqlite3 prompt
    started     TEXT GENERATED ALWAYS AS (started_at) VIRTUAL,
    finished    TEXT GENERATED ALWAYS AS (finished_at) VIRTUAL
);
CREATE INDEX sync_runs_audience ON sync_runs (audience, id);
