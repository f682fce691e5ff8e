-- Delivery indexes for the write path and for retention.
--
-- 1. Event deliveries no longer go through a unique index on idempotency_key.
--
-- An event delivery's key is a hash of (write key, messageId, mapping): random,
-- so each insert into the unique index landed on a random page of it, the same
-- write amplification migration 4 removed from `events`, paid by every mapper
-- transaction while ingest waited for the write lock. Nothing needs it: the
-- mapper files an event only while it is still `received`, in the transaction
-- that creates its deliveries. Audience keys sort in the order a sync enqueues
-- them (cheap to index) and keep their uniqueness.
DROP INDEX deliveries_idempotency;
CREATE UNIQUE INDEX deliveries_idempotency ON deliveries (idempotency_key)
    WHERE audience_key IS NOT NULL;

-- 2. Retention deletes superseded rows past store.retention; without an index
-- of their own that DELETE scanned the whole table (0.19 s with a million
-- deliveries) while holding the write lock, at every retention run.
CREATE INDEX deliveries_superseded ON deliveries (created_at) WHERE state = 'superseded';
