-- Raw Segment messages, exactly as acknowledged (plus messageId, receivedAt and
-- the corrected timestamp). One row per (write key, messageId): a repeat is
-- acknowledged but not stored again.
-- (CHECK constraints here and in later migrations compare with OR, not
-- IN (...): SQLite builds a temporary table for an IN list on every row
-- written, which makes each insert about 3x dearer.)
CREATE TABLE events (
    id           INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL,
    -- first 16 bytes of SHA-256 of the write key, hex; never the key itself
    write_key    TEXT NOT NULL,
    type         TEXT NOT NULL CHECK (type = 'track' OR type = 'identify' OR type = 'group' OR type = 'page' OR type = 'screen' OR type = 'alias'),
    user_id      TEXT,
    anonymous_id TEXT,
    event        TEXT,
    -- event time (RFC 3339 UTC), as written into raw.timestamp
    timestamp    TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    -- received: waiting to be mapped; mapped: deliveries created;
    -- skipped: no mapping matched; membership: an Engage audience change
    status       TEXT NOT NULL DEFAULT 'received'
                 CHECK (status = 'received' OR status = 'mapped' OR status = 'skipped' OR status = 'membership'),
    raw          TEXT NOT NULL
);

CREATE UNIQUE INDEX events_message_id ON events (message_id, write_key);
-- the mapper walks the received rows in arrival order; the partial index stays small
CREATE INDEX events_received ON events (id) WHERE status = 'received';
