//! The retry policy (SPEC section 6) as plain functions of what happened, so
//! the worker stays a thin loop and every rule here is checked by a table of
//! cases instead of a live server.
//!
//! - [`decide`] turns one attempt's outcome (an HTTP status with its
//!   `Retry-After`, a timeout, a connection error) into a [`RetryDecision`].
//! - [`parse_retry_after`] reads `Retry-After` in both of its forms.
//! - [`backoff`] is exponential backoff with full jitter, capped.
//! - [`retry_delay`] combines the two: never earlier than `Retry-After`.
//! - [`retry_exhausted`] says when a delivery stops being retried.
//!
//! Nothing here does I/O or reads the clock: `now` and the random source are
//! passed in.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

/// What one attempt to send a batch produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Schematic answered. `retry_after` is the raw `Retry-After` header, if
    /// there was one.
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// No answer within `schematic.timeout`.
    Timeout,
    /// The request never got an answer: DNS, connect, TLS, reset, etc.
    Connection(String),
}

/// What the worker does with the batch after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    /// Any 2xx: mark every event of the batch delivered.
    Delivered,
    /// Transient failure (connection error, timeout, 408, 429, 5xx except
    /// 501/505): try again later. `not_before` comes from `Retry-After`;
    /// no request may be made before it.
    Retry { not_before: Option<Duration> },
    /// 400/413/422 on a batch of more than one event: one event is probably
    /// bad, so split the batch in halves and send each on its own.
    SplitBatch,
    /// The request will never succeed as it is: mark it failed with the
    /// response, ready for replay.
    Permanent,
    /// 401/403: the API key is wrong. Pause all sending, keep everything
    /// pending and spend no attempt.
    Pause,
}

/// Decides what to do after one attempt on a batch of `batch_len` events.
///
/// `Retry-After` is honoured on every retryable status (429 and 503 are the
/// ones that usually carry it); on other statuses it is ignored. A status
/// outside 100..=599 is not HTTP and is treated as permanent.
pub fn decide(outcome: &AttemptOutcome, batch_len: usize, now: DateTime<Utc>) -> RetryDecision {
    let (code, retry_after) = match outcome {
        AttemptOutcome::Timeout | AttemptOutcome::Connection(_) => {
            return RetryDecision::Retry { not_before: None }
        }
        AttemptOutcome::Status { code, retry_after } => (*code, retry_after.as_deref()),
    };
    let retry = || RetryDecision::Retry {
        not_before: retry_after.and_then(|value| parse_retry_after(value, now)),
    };
    match code {
        200..=299 => RetryDecision::Delivered,
        401 | 403 => RetryDecision::Pause,
        408 | 429 => retry(),
        400 | 413 | 422 if batch_len > 1 => RetryDecision::SplitBatch,
        501 | 505 => RetryDecision::Permanent,
        500..=599 => retry(),
        // 1xx, 3xx (the capture URL is wrong), every other 4xx, and anything
        // that is not an HTTP status.
        _ => RetryDecision::Permanent,
    }
}

/// Reads a `Retry-After` value: delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, and the two obsolete date forms).
///
/// A date in the past gives `Some(0)`. Anything else (empty, negative,
/// fractional, unparseable) gives `None`, so the caller falls back to its
/// own backoff. Delta-seconds too large for a `u64` saturate at
/// `u64::MAX` seconds: callers add the result with checked or saturating
/// arithmetic (the retry window ends such a delivery anyway).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits, so the only way parsing can fail is overflow.
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    let now = SystemTime::from(now);
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before retry number `attempt` (1 = the first retry): full
/// jitter, uniform in `[0, min(max, base * 2^(attempt-1))]`.
///
/// `attempt` 0 is treated as 1. Huge attempt numbers or bases do not
/// overflow: the ceiling simply stays at `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut impl rand::Rng) -> Duration {
    let exponent = attempt.saturating_sub(1);
    let ceiling = 2u32
        .checked_pow(exponent)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(max, |grown| grown.min(max));
    rng.gen_range(Duration::ZERO..=ceiling)
}

/// When to make retry number `attempt`: the backoff, but never before the
/// `Retry-After` the server asked for. Taking the larger of the two (rather
/// than `Retry-After` alone) keeps a server that keeps answering
/// `Retry-After: 0` from being retried in a tight loop.
pub fn retry_delay(
    not_before: Option<Duration>,
    attempt: u32,
    base: Duration,
    max: Duration,
    rng: &mut impl rand::Rng,
) -> Duration {
    let jittered = backoff(attempt, base, max, rng);
    not_before.map_or(jittered, |floor| floor.max(jittered))
}

/// Whether a delivery that just failed a retryable attempt should become
/// `failed` instead of being scheduled again.
///
/// `attempts` counts the attempts made so far, including the one that just
/// failed. Exhausted once `retry_window` has elapsed since the first attempt
/// (at exactly the window's end, too), or once `attempts` reaches
/// `max_attempts` when that is set. A clock that went backwards (`now` before
/// `first_attempt_at`) never exhausts the window.
pub fn retry_exhausted(
    first_attempt_at: DateTime<Utc>,
    now: DateTime<Utc>,
    attempts: u32,
    retry_window: Duration,
    max_attempts: Option<u32>,
) -> bool {
    if max_attempts.is_some_and(|max| attempts >= max) {
        return true;
    }
    // `to_std` fails only for a negative span, i.e. the clock went backwards.
    (now - first_attempt_at)
        .to_std()
        .is_ok_and(|elapsed| elapsed >= retry_window)
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::TimeZone;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn now() -> DateTime<Utc> {
        // A fixed, valid calendar date and time: `single` always has a value.
        Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0)
            .single()
            .expect("valid fixed date")
    }

    fn status(code: u16) -> AttemptOutcome {
        AttemptOutcome::Status {
            code,
            retry_after: None,
        }
    }

    fn status_with_retry_after(code: u16, value: &str) -> AttemptOutcome {
        AttemptOutcome::Status {
            code,
            retry_after: Some(value.to_owned()),
        }
    }

    const RETRY: RetryDecision = RetryDecision::Retry { not_before: None };

    #[test]
    fn decide_by_status() {
        use RetryDecision::*;
        // (status, batch length, expected)
        let table: &[(u16, usize, RetryDecision)] = &[
            (200, 1, Delivered),
            (200, 100, Delivered),
            (201, 5, Delivered),
            (202, 1, Delivered),
            (204, 1, Delivered),
            (299, 1, Delivered),
            (100, 1, Permanent),
            (101, 3, Permanent),
            (301, 1, Permanent),
            (302, 4, Permanent),
            (304, 1, Permanent),
            (400, 1, Permanent),
            (400, 2, SplitBatch),
            (400, 100, SplitBatch),
            (401, 1, Pause),
            (401, 50, Pause),
            (403, 1, Pause),
            (403, 50, Pause),
            (404, 1, Permanent),
            (404, 10, Permanent),
            (405, 1, Permanent),
            (408, 1, RETRY),
            (408, 10, RETRY),
            (409, 1, Permanent),
            (413, 1, Permanent),
            (413, 2, SplitBatch),
            (422, 1, Permanent),
            (422, 7, SplitBatch),
            (429, 1, RETRY),
            (429, 100, RETRY),
            (451, 1, Permanent),
            (500, 1, RETRY),
            (500, 100, RETRY),
            (501, 1, Permanent),
            (501, 100, Permanent),
            (502, 1, RETRY),
            (503, 1, RETRY),
            (504, 1, RETRY),
            (505, 1, Permanent),
            (505, 9, Permanent),
            (599, 1, RETRY),
            (0, 1, Permanent),
            (600, 1, Permanent),
            (999, 1, Permanent),
        ];
        for (code, batch_len, expected) in table {
            assert_eq!(
                decide(&status(*code), *batch_len, now()),
                *expected,
                "status {code} on a batch of {batch_len}"
            );
        }
    }

    #[test]
    fn decide_without_an_answer() {
        let table = [
            AttemptOutcome::Timeout,
            AttemptOutcome::Connection("connection refused".into()),
            AttemptOutcome::Connection(String::new()),
        ];
        for outcome in table {
            for batch_len in [1, 100] {
                assert_eq!(decide(&outcome, batch_len, now()), RETRY, "{outcome:?}");
            }
        }
    }

    #[test]
    fn decide_honours_retry_after_on_retryable_statuses_only() {
        use RetryDecision::*;
        let retry_in = |s| Retry {
            not_before: Some(Duration::from_secs(s)),
        };
        let date_in_2m = "Fri, 01 Mar 2024 12:02:00 GMT";
        let date_past = "Fri, 01 Mar 2024 11:00:00 GMT";
        // (status, Retry-After, batch length, expected)
        let table: &[(u16, &str, usize, RetryDecision)] = &[
            (429, "90", 1, retry_in(90)),
            (429, "90", 100, retry_in(90)),
            (503, "90", 3, retry_in(90)),
            (429, date_in_2m, 1, retry_in(120)),
            (503, date_in_2m, 1, retry_in(120)),
            (503, date_past, 1, retry_in(0)),
            (503, "0", 1, retry_in(0)),
            (500, "5", 1, retry_in(5)),
            (408, "5", 1, retry_in(5)),
            (429, "soon", 1, RETRY),
            (429, "", 1, RETRY),
            (503, "-5", 1, RETRY),
            // Ignored where the status is not retried.
            (200, "90", 1, Delivered),
            (501, "90", 1, Permanent),
            (400, "90", 2, SplitBatch),
            (400, "90", 1, Permanent),
            (401, "90", 1, Pause),
        ];
        for (code, value, batch_len, expected) in table {
            assert_eq!(
                decide(&status_with_retry_after(*code, value), *batch_len, now()),
                *expected,
                "status {code} with Retry-After {value:?}"
            );
        }
    }

    #[test]
    fn retry_after_forms() {
        let secs = |s| Some(Duration::from_secs(s));
        // now() is Fri, 01 Mar 2024 12:00:00 GMT.
        let table: &[(&str, Option<Duration>)] = &[
            ("0", secs(0)),
            ("1", secs(1)),
            ("120", secs(120)),
            ("  30 ", secs(30)),
            ("007", secs(7)),
            ("86400", secs(86_400)),
            ("99999999999999999999999999", secs(u64::MAX)),
            ("Fri, 01 Mar 2024 12:00:30 GMT", secs(30)),
            ("Sat, 02 Mar 2024 12:00:00 GMT", secs(86_400)),
            // The obsolete RFC 850 and asctime forms.
            ("Friday, 01-Mar-24 12:01:00 GMT", secs(60)),
            ("Fri Mar  1 12:00:10 2024", secs(10)),
            // Now and the past: go ahead at once.
            ("Fri, 01 Mar 2024 12:00:00 GMT", secs(0)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", secs(0)),
            // Garbage.
            ("", None),
            ("   ", None),
            ("-1", None),
            ("1.5", None),
            ("+10", None),
            ("10s", None),
            ("soon", None),
            ("2024-03-01T12:01:00Z", None),
            ("Fri, 32 Mar 2024 12:00:00 GMT", None),
        ];
        for (value, expected) in table {
            assert_eq!(
                parse_retry_after(value, now()),
                *expected,
                "Retry-After {value:?}"
            );
        }
    }

    #[test]
    fn retry_after_date_with_subsecond_now() {
        // The header has whole seconds; a `now` a little after that second is
        // already past it.
        let later = now() + chrono::TimeDelta::milliseconds(400);
        assert_eq!(
            parse_retry_after("Fri, 01 Mar 2024 12:00:00 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Fri, 01 Mar 2024 12:00:01 GMT", later),
            Some(Duration::from_millis(600))
        );
    }

    #[test]
    fn backoff_stays_within_its_ceiling_and_uses_all_of_it() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let mut rng = StdRng::seed_from_u64(7);
        // (attempt, ceiling)
        let table: &[(u32, Duration)] = &[
            (0, base),
            (1, base),
            (2, base * 2),
            (3, base * 4),
            (5, base * 16),
            (9, Duration::from_secs(256)),
            (10, max),
            (11, max),
            (32, max),
            (33, max),
            (64, max),
            (1_000, max),
            (u32::MAX, max),
        ];
        for (attempt, ceiling) in table {
            let draws: Vec<Duration> = (0..2_000)
                .map(|_| backoff(*attempt, base, max, &mut rng))
                .collect();
            let highest = draws.iter().max().copied().unwrap_or_default();
            let lowest = draws.iter().min().copied().unwrap_or_default();
            assert!(highest <= *ceiling, "attempt {attempt}: {highest:?}");
            // Full jitter: the draws cover the whole range, not just its top.
            assert!(highest >= ceiling.mul_f64(0.95), "attempt {attempt}");
            assert!(lowest <= ceiling.mul_f64(0.05), "attempt {attempt}");
        }
    }

    #[test]
    fn backoff_does_not_overflow() {
        let mut rng = StdRng::seed_from_u64(1);
        let table: &[(u32, Duration, Duration)] = &[
            (u32::MAX, Duration::MAX, Duration::MAX),
            (40, Duration::from_secs(u64::MAX / 2), Duration::MAX),
            (2, Duration::MAX, Duration::from_secs(60)),
            (1, Duration::from_secs(10), Duration::from_secs(5)),
            (3, Duration::ZERO, Duration::from_secs(5)),
            (3, Duration::from_secs(1), Duration::ZERO),
        ];
        for (attempt, base, max) in table {
            for _ in 0..100 {
                let wait = backoff(*attempt, *base, *max, &mut rng);
                assert!(wait <= *max, "attempt {attempt}, base {base:?}");
                assert!(wait <= base.saturating_mul(1 << 31), "attempt {attempt}");
            }
        }
    }

    #[test]
    fn retry_delay_never_comes_before_retry_after() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let mut rng = StdRng::seed_from_u64(3);
        for attempt in 1..=12 {
            for _ in 0..200 {
                let floor = Duration::from_secs(30);
                assert!(retry_delay(Some(floor), attempt, base, max, &mut rng) >= floor);
                let zero = retry_delay(Some(Duration::ZERO), attempt, base, max, &mut rng);
                assert!(zero <= max);
                assert!(retry_delay(None, attempt, base, max, &mut rng) <= max);
            }
        }
        // With a 1 s ceiling, an hour's Retry-After is exactly what is used.
        let hour = Duration::from_secs(3_600);
        assert_eq!(retry_delay(Some(hour), 1, base, max, &mut rng), hour);
    }

    #[test]
    fn retry_window_and_max_attempts() {
        let first = now();
        let window = Duration::from_secs(4 * 3_600);
        let at = |secs: i64| first + chrono::TimeDelta::seconds(secs);
        // (now, attempts, max_attempts, exhausted)
        let table: &[(DateTime<Utc>, u32, Option<u32>, bool)] = &[
            (at(0), 1, None, false),
            (at(60), 5, None, false),
            (at(4 * 3_600 - 1), 40, None, false),
            (at(4 * 3_600), 41, None, true),
            (at(5 * 3_600), 2, None, true),
            (at(30 * 86_400), 2, None, true),
            // The clock went backwards: not exhausted by the window.
            (at(-3_600), 1, None, false),
            // max_attempts counts attempts made, including the last one.
            (at(10), 1, Some(3), false),
            (at(10), 2, Some(3), false),
            (at(10), 3, Some(3), true),
            (at(10), 4, Some(3), true),
            (at(10), 1, Some(1), true),
            (at(10), u32::MAX, None, false),
            // Whichever comes first.
            (at(5 * 3_600), 1, Some(3), true),
            (at(-3_600), 3, Some(3), true),
        ];
        for (now, attempts, max_attempts, expected) in table {
            assert_eq!(
                retry_exhausted(first, *now, *attempts, window, *max_attempts),
                *expected,
                "now {now}, attempts {attempts}, max {max_attempts:?}"
            );
        }
    }

    #[test]
    fn huge_retry_window_never_ends() {
        let far = now() + chrono::TimeDelta::days(365 * 100);
        assert!(!retry_exhausted(now(), far, 1_000, Duration::MAX, None));
    }
}
