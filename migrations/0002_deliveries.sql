-- One row per Schematic event to send. A delivery comes from an event and a
-- mapping (event_id, mapping) or from an audience sync (audience_key, user_id).
CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind = 'track' OR kind = 'identify'),
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state = 'pending' OR state = 'in_flight' OR state = 'delivered' OR state = 'failed' OR state = 'superseded'),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    lease_until      TEXT,
    first_attempt_at TEXT,
    last_attempt_at  TEXT,
    last_status      INTEGER,
    last_error       TEXT,
    last_response    TEXT,
    -- stable across retries and replays: Schematic drops repeats within 24 h
    idempotency_key  TEXT NOT NULL,
    -- {"type","sent_at","body"}; api_key and idempotency_key are added when sent.
    -- NULL when the mapping itself failed (last_error says why).
    payload          TEXT,
    event_id         INTEGER REFERENCES events (id),
    mapping          TEXT,
    audience_key     TEXT,
    user_id          TEXT,
    sync_run_id      INTEGER,
    created_at       TEXT NOT NULL,
    delivered_at     TEXT,
    CHECK (event_id IS NOT NULL OR (audience_key IS NOT NULL AND user_id IS NOT NULL))
);

-- claims walk this index in its own order: cost per claim does not grow with the queue
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'in_flight';
CREATE INDEX deliveries_failed ON deliveries (id) WHERE state = 'failed';
CREATE INDEX deliveries_delivered ON deliveries (delivered_at) WHERE state = 'delivered';
CREATE INDEX deliveries_event ON deliveries (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX deliveries_pair ON deliveries (audience_key, user_id, id) WHERE audience_key IS NOT NULL;
CREATE UNIQUE INDEX deliveries_idempotency ON deliveries (idempotency_key);

-- every request made for a delivery: row-level history
CREATE TABLE delivery_attempts (
    id           INTEGER PRIMARY KEY,
    delivery_id  INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempted_at TEXT NOT NULL,
    status       INTEGER,
    error        TEXT,
    duration_ms  INTEGER NOT NULL
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id);

-- views for people at the sqlite3 prompt
CREATE VIEW queue_summary AS
SELECT state,
       count(*)                                             AS count,
       min(created_at)                                      AS oldest,
       min(CASE WHEN state = 'pending' THEN next_attempt_at END) AS next_due
FROM deliveries
GROUP BY state;

CREATE VIEW failed_deliveries AS
SELECT d.id, d.kind, d.mapping, e.message_id, d.audience_key, d.user_id,
       d.attempts, d.last_status, d.last_error, d.last_response,
       d.first_attempt_at, d.last_attempt_at, d.created_at
FROM deliveries d
LEFT JOIN events e ON e.id = d.event_id
WHERE d.state = 'failed';

CREATE VIEW due_deliveries AS
SELECT id, kind, mapping, audience_key, user_id, attempts, next_attempt_at, last_status, last_error
FROM deliveries
WHERE state = 'pending' AND next_attempt_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
ORDER BY next_attempt_at, id;

-- the worker's shared state, so `status` and `drain` see what `serve` knows:
-- 'paused' (why sending is paused) and 'not_before' (a Retry-After deadline)
CREATE TABLE worker_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
