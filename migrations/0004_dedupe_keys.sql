-- Deduplication without a unique index on random messageIds.
--
-- The unique index on (message_id, write_key) made every insert land on a
-- random page of a large B-tree: each stored event cost about one 4 KiB page
-- written to the WAL and again at checkpoint, which capped ingest at the
-- disk's write rate. Now each row carries `dedupe_key`, a 64-bit hash of its
-- write key hash and messageId; the daemon keeps the keys of the retention
-- window in memory and checks them under the write lock, and the index below,
-- ordered by id, is only appended to. Reading it back at start-up (or to pick
-- up rows another process wrote) touches a few bytes per event.
-- Rows stored before this migration have NULL here; the next start fills them.
ALTER TABLE events ADD COLUMN dedupe_key INTEGER;
DROP INDEX events_message_id;
CREATE INDEX events_dedupe ON events (id, dedupe_key);
