//! Deduplication of `messageId`s (SPEC 2.1) without a unique index.
//!
//! Every stored event carries `dedupe_key`, 64 bits of SHA-256 over its write
//! key hash and messageId. The writer keeps the keys of the retention window
//! in memory and checks each new row against them while it holds the write
//! lock. The keys are split into a few time slices, so that expiring old keys
//! is dropping a slice: the newest is a hash set (10 to 21 bytes a key), the
//! older ones sorted vectors (8 bytes a key). The on-disk side is the
//! `events_dedupe` index on `(id, dedupe_key)`: ordered by id, it is only
//! ever appended to, so a stored event costs a few bytes of index instead of
//! a random page of a B-tree keyed by random UUIDs (which capped ingest at
//! the disk's write rate).
//!
//! The set is a cache of that index: it is read back at start-up and, inside
//! each write transaction, topped up with rows other processes (an `ingest`
//! backfill) stored since, so deduplication stays exact across processes.
//! Two different messages share a key with probability 2^-64 per pair.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::store::time_text;

/// Time slices the window is split into; a key lives between `window` and
/// `window * (1 + 1/SLICES)`, and a lookup probes this many sets.
const SLICES: i64 = 4;
/// Rows per transaction when filling keys of rows stored before migration 4.
const BACKFILL_BATCH: usize = 10_000;

/// The key of one message: the first 8 bytes of
/// SHA-256(write key hash, NUL, messageId), as SQLite's signed integer.
pub fn dedupe_key(write_key_hash: &str, message_id: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(write_key_hash.as_bytes());
    h.update([0u8]);
    h.update(message_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_le_bytes(first)
}

/// The keys are already uniform hash output: hashing them again would only
/// cost time.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_i64(&mut self, n: i64) {
        self.0 = n as u64;
    }
}

type KeySet = HashSet<i64, BuildHasherDefault<KeyHasher>>;

struct Slice {
    /// Keys in this slice were stored before this time (unix seconds).
    ends: i64,
    keys: Keys,
}

/// The keys of one slice: a hash set while keys are added to it, then, once
/// a newer slice takes over, a sorted vector (8 bytes a key instead of the
/// set's 10 to 21).
enum Keys {
    Open(KeySet),
    Frozen(Vec<i64>),
}

impl Keys {
    fn len(&self) -> usize {
        match self {
            Keys::Open(set) => set.len(),
            Keys::Frozen(sorted) => sorted.len(),
        }
    }

    fn contains(&self, key: i64) -> bool {
        match self {
            Keys::Open(set) => set.contains(&key),
            Keys::Frozen(sorted) => sorted_contains(sorted, key),
        }
    }

    fn freeze(&mut self) {
        if let Keys::Open(set) = self {
            let mut sorted: Vec<i64> = set.drain().collect();
            sorted.sort_unstable();
            *self = Keys::Frozen(sorted);
        }
    }
}

/// Interpolation steps before `sorted_contains` falls back to bisection.
const INTERPOLATION_STEPS: usize = 6;

/// Whether `sorted` holds `key`. The keys are uniform hash output, so
/// interpolating the position finds it in a few probes (log log n), where
/// bisection of a million keys takes 20, each a cache miss on the writer's
/// path. Bisection finishes whatever a few steps leave, so skewed keys cost
/// at most log n.
fn sorted_contains(sorted: &[i64], key: i64) -> bool {
    let (mut lo, mut hi) = (0usize, sorted.len());
    for _ in 0..INTERPOLATION_STEPS {
        if lo >= hi {
            return false;
        }
        let (first, last) = (sorted[lo], sorted[hi - 1]);
        if key < first || key > last {
            return false;
        }
        if first == last {
            return first == key;
        }
        let span = i128::from(last) - i128::from(first);
        let offset = (i128::from(key) - i128::from(first)) * (hi - 1 - lo) as i128 / span;
        let pos = lo + offset as usize;
        match sorted[pos].cmp(&key) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = pos + 1,
            std::cmp::Ordering::Greater => hi = pos,
        }
    }
    sorted[lo..hi].binary_search(&key).is_ok()
}

/// The in-memory keys of the window, plus the keys of the transaction being
/// written (staged until it commits).
pub struct Dedupe {
    window: i64,
    slice: i64,
    slices: VecDeque<Slice>,
    /// Highest `events.id` whose key is in the set.
    last_id: i64,
    staged: KeySet,
    /// (key, events.id) in the order they were staged
    staged_order: Vec<(i64, i64)>,
}

/// What `Dedupe::load` found, for the start-up log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loaded {
    pub keys: usize,
    pub backfilled: usize,
}

impl Dedupe {
    /// An empty set for a window (at least one second).
    pub fn new(window: Duration) -> Dedupe {
        let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX).max(1);
        Dedupe {
            window,
            slice: (window / SLICES).max(1),
            slices: VecDeque::new(),
            last_id: 0,
            staged: KeySet::default(),
            staged_order: Vec::new(),
        }
    }

    /// Reads the keys of the events received within `window` before `now`,
    /// first filling the keys of rows stored before migration 4.
    pub fn load(
        conn: &Connection,
        window: Duration,
        now: DateTime<Utc>,
    ) -> rusqlite::Result<(Dedupe, Loaded)> {
        let mut dedupe = Dedupe::new(window);
        let backfilled = backfill(conn)?;
        let bounds: Option<(i64, i64)> =
            conn.query_row("SELECT min(id), max(id) FROM events", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })?;
        let Some((min_id, max_id)) = bounds else {
            return Ok((
                dedupe,
                Loaded {
                    keys: 0,
                    backfilled,
                },
            ));
        };
        // Slice k holds the rows received in [cutoff_k, cutoff_k + slice);
        // events arrive in id order, so each cutoff is an id boundary.
        let now_s = now.timestamp();
        let mut cutoff = now_s.saturating_sub(dedupe.window);
        let mut start = first_id_received_at_or_after(conn, min_id, max_id, cutoff)?;
        let mut keys = 0;
        while cutoff <= now_s {
            let ends = cutoff.saturating_add(dedupe.slice);
            let end_id = if ends > now_s {
                i64::MAX
            } else {
                first_id_received_at_or_after(conn, start, max_id, ends)?
            };
            let mut set = KeySet::default();
            let mut stmt = conn.prepare_cached(
                "SELECT dedupe_key FROM events INDEXED BY events_dedupe
                 WHERE id >= ?1 AND id < ?2 AND dedupe_key IS NOT NULL",
            )?;
            let mut rows = stmt.query(params![start, end_id])?;
            while let Some(row) = rows.next()? {
                set.insert(row.get(0)?);
            }
            keys += set.len();
            if let Some(previous) = dedupe.slices.back_mut() {
                previous.keys.freeze();
            }
            dedupe.slices.push_back(Slice {
                ends,
                keys: Keys::Open(set),
            });
            start = end_id;
            cutoff = ends;
        }
        dedupe.last_id = max_id;
        Ok((dedupe, Loaded { keys, backfilled }))
    }

    /// Keys in memory.
    pub fn len(&self) -> usize {
        self.slices.iter().map(|s| s.keys.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a write transaction's checks: drops anything staged by one that
    /// did not commit and takes in the keys other processes stored since.
    /// Call it inside the transaction, so nobody else can write meanwhile.
    pub fn begin(&mut self, conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<()> {
        self.abort();
        let mut stmt = conn.prepare_cached(
            "SELECT id, dedupe_key FROM events INDEXED BY events_dedupe
             WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query([self.last_id])?;
        let mut others = Vec::new();
        let mut last_id = self.last_id;
        while let Some(row) = rows.next()? {
            last_id = row.get(0)?;
            if let Some(key) = row.get::<_, Option<i64>>(1)? {
                others.push(key);
            }
        }
        drop(rows);
        self.add(others, now);
        self.last_id = last_id;
        Ok(())
    }

    /// Whether a message with this key is stored, or staged in this
    /// transaction.
    pub fn seen(&self, key: i64) -> bool {
        self.staged.contains(&key) || self.slices.iter().rev().any(|s| s.keys.contains(key))
    }

    /// Records that row `id` with this key was inserted in the transaction.
    pub fn stage(&mut self, key: i64, id: i64) {
        self.staged.insert(key);
        self.staged_order.push((key, id));
    }

    /// A point to return to when a savepoint rolls back.
    pub fn mark(&self) -> usize {
        self.staged_order.len()
    }

    /// Forgets what was staged after `mark` (its savepoint rolled back).
    pub fn rollback_to(&mut self, mark: usize) {
        for (key, _) in self.staged_order.drain(mark.min(self.staged_order.len())..) {
            self.staged.remove(&key);
        }
    }

    /// The transaction committed: its keys become part of the set.
    pub fn commit(&mut self, now: DateTime<Utc>) {
        let staged = std::mem::take(&mut self.staged_order);
        self.staged.clear();
        if let Some(last) = staged.iter().map(|&(_, id)| id).max() {
            self.last_id = self.last_id.max(last);
        }
        self.add(staged.into_iter().map(|(key, _)| key).collect(), now);
    }

    /// The transaction rolled back: nothing it staged was stored.
    pub fn abort(&mut self) {
        self.staged.clear();
        self.staged_order.clear();
    }

    fn add(&mut self, keys: Vec<i64>, now: DateTime<Utc>) {
        let now = now.timestamp();
        while self
            .slices
            .front()
            .is_some_and(|s| s.ends.saturating_add(self.window) < now)
        {
            self.slices.pop_front();
        }
        if keys.is_empty() {
            return;
        }
        if self.slices.back().is_none_or(|s| s.ends <= now) {
            if let Some(previous) = self.slices.back_mut() {
                previous.keys.freeze();
            }
            self.slices.push_back(Slice {
                ends: now.saturating_add(self.slice),
                keys: Keys::Open(KeySet::default()),
            });
        }
        if let Some(Slice {
            keys: Keys::Open(current),
            ..
        }) = self.slices.back_mut()
        {
            current.extend(keys);
        }
    }
}

/// The smallest id in `[lo, hi]` whose row, or the first row after it, was
/// received at or after `t` (unix seconds); `hi + 1` when none was. Relies on
/// events being stored in the order they arrive, as retention does.
fn first_id_received_at_or_after(
    conn: &Connection,
    mut lo: i64,
    hi: i64,
    t: i64,
) -> rusqlite::Result<i64> {
    let Some(t) = DateTime::<Utc>::from_timestamp(t, 0) else {
        return Ok(lo);
    };
    let t = time_text(t);
    let mut stmt = conn.prepare_cached(
        "SELECT received_at >= ?2 FROM events WHERE id >= ?1 ORDER BY id LIMIT 1",
    )?;
    let mut hi = hi.saturating_add(1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at_or_after: Option<bool> = stmt.query_row(params![mid, t], |r| r.get(0)).optional()?;
        if at_or_after.unwrap_or(true) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// Fills `dedupe_key` for rows stored before migration 4; returns how many.
fn backfill(conn: &Connection) -> rusqlite::Result<usize> {
    let mut total = 0;
    let mut after = 0i64;
    loop {
        let missing: Vec<(i64, String, String)> = {
            let mut stmt = conn.prepare_cached(
                "SELECT e.id, e.write_key, e.message_id FROM events e
                 WHERE e.id IN (SELECT id FROM events INDEXED BY events_dedupe
                                WHERE id > ?1 AND dedupe_key IS NULL ORDER BY id LIMIT ?2)
                 ORDER BY e.id",
            )?;
            let rows = stmt.query_map(params![after, BACKFILL_BATCH as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(&(last, _, _)) = missing.last() else {
            return Ok(total);
        };
        after = last;
        // dropped on an error, the transaction rolls back
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        {
            let mut update =
                tx.prepare_cached("UPDATE events SET dedupe_key = ?2 WHERE id = ?1")?;
            for (id, write_key, message_id) in &missing {
                update.execute(params![id, dedupe_key(write_key, message_id)])?;
            }
        }
        tx.commit()?;
        total += missing.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_750_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn keys_expire_after_the_window_and_not_before() {
        let mut d = Dedupe::new(Duration::from_secs(100));
        d.stage(1, 1);
        d.commit(at(0));
        for t in [1, 50, 99, 100] {
            d.add(vec![], at(t));
            assert!(d.seen(1), "expired early at {t}");
        }
        // kept at most one slice (25 s) past the window
        d.add(vec![], at(126));
        assert!(!d.seen(1));
        assert!(d.is_empty());
    }

    #[test]
    fn a_rolled_back_savepoint_or_transaction_forgets_its_keys() {
        let mut d = Dedupe::new(Duration::from_secs(100));
        d.stage(1, 1);
        let mark = d.mark();
        d.stage(2, 2);
        assert!(d.seen(2));
        d.rollback_to(mark);
        assert!(d.seen(1) && !d.seen(2));
        d.commit(at(0));
        d.stage(3, 3);
        d.abort();
        assert!(d.seen(1) && !d.seen(3));
        assert_eq!(d.last_id, 1);
    }

    #[test]
    fn load_reads_the_keys_of_the_window_and_fills_missing_ones() {
        let (_dir, _, conn) = crate::store::temp_store();
        let now = at(30 * 86_400);
        // received 10 days, 2 days and 1 hour before now; the middle one as
        // stored before migration 4, without its key
        for (id, ago, key) in [
            ("old", 10 * 86_400, Some(dedupe_key("k", "old"))),
            ("mid", 2 * 86_400, None),
            ("new", 3_600, Some(dedupe_key("k", "new"))),
        ] {
            conn.execute(
                "INSERT INTO events (message_id, write_key, dedupe_key, type, timestamp,
                                     received_at, raw)
                 VALUES (?1, 'k', ?2, 'track', ?3, ?3, '{}')",
                params![id, key, time_text(now - chrono::Duration::seconds(ago))],
            )
            .unwrap();
        }
        let (d, loaded) = Dedupe::load(&conn, Duration::from_secs(7 * 86_400), now).unwrap();
        assert_eq!((loaded.keys, loaded.backfilled), (2, 1));
        assert!(d.seen(dedupe_key("k", "mid")) && d.seen(dedupe_key("k", "new")));
        assert!(!d.seen(dedupe_key("k", "old")), "older than the window");
        assert_eq!(d.last_id, 3);
        let filled: i64 = conn
            .query_row(
                "SELECT dedupe_key FROM events WHERE message_id = 'mid'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(filled, dedupe_key("k", "mid"));
    }

    #[test]
    fn a_frozen_slice_finds_exactly_its_keys() {
        // splitmix64: uniform keys, like SHA-256 output
        let mut state = 0x5eed_u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as i64
        };
        let stored: Vec<i64> = (0..100_000).map(|_| next()).collect();
        let mut keys = Keys::Open(stored.iter().copied().collect());
        keys.freeze();
        assert!(matches!(keys, Keys::Frozen(_)));
        assert!(
            stored.iter().all(|&k| keys.contains(k)),
            "a stored key is missed"
        );
        let others: HashSet<i64> = stored.iter().copied().collect();
        for _ in 0..100_000 {
            let k = next();
            assert_eq!(keys.contains(k), others.contains(&k));
        }
        for edge in [i64::MIN, i64::MAX, 0, -1] {
            assert_eq!(keys.contains(edge), others.contains(&edge));
        }
        // skewed keys (not hash output) still work, by bisection
        let mut skewed = Keys::Open((0..1000).map(|i| i * i * i).collect());
        skewed.freeze();
        assert!((0..1000).all(|i| skewed.contains(i * i * i)));
        assert!(!skewed.contains(2) && !skewed.contains(999 * 999 * 999 + 1));
        let mut empty = Keys::Open(KeySet::default());
        empty.freeze();
        assert!(!empty.contains(0));
    }

    #[test]
    fn older_slices_are_frozen_and_still_deduplicate() {
        let mut d = Dedupe::new(Duration::from_secs(100));
        d.stage(1, 1);
        d.commit(at(0));
        d.stage(2, 2);
        d.commit(at(30)); // a new slice: the first one is frozen
        assert!(matches!(d.slices[0].keys, Keys::Frozen(_)));
        assert!(matches!(d.slices[1].keys, Keys::Open(_)));
        assert!(d.seen(1) && d.seen(2) && !d.seen(3));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn key_depends_on_write_key_and_message_id() {
        let a = dedupe_key("k1", "m1");
        assert_eq!(a, dedupe_key("k1", "m1"));
        assert_ne!(a, dedupe_key("k2", "m1"));
        assert_ne!(a, dedupe_key("k1", "m2"));
        // the separator keeps ("k1m", "1") apart from ("k1", "m1")
        assert_ne!(a, dedupe_key("k1m", "1"));
    }
}
