//! Soak program (`cargo bench --bench soak`; not a unit test).
//!
//! Runs the real daemon (`schematic-sync serve`, the binary cargo built)
//! against the strict mock of Schematic's capture API
//! (`tests/support/mock_schematic.rs`) for `SOAK_SECONDS`:
//!
//! - several clients (tokio tasks, `reqwest`) send `/v1/track`,
//!   `/v1/identify` and `/v1/batch` requests at a steady total rate, each
//!   message with its own `messageId`, plus Engage membership messages
//!   (identify traits or "Audience Entered/Exited" tracks) that flip a few
//!   hundred users in and out of the audience `soak_audience`. Each audience
//!   user belongs to one client, which sends its messages in order, so the
//!   desired final state of a user is the last value acknowledged for it.
//!   Only a `200 {"success":true}` counts as acknowledged; anything else
//!   (connection refused while the daemon restarts, timeouts, 503) is retried
//!   with the same body (same messageIds) until it is acknowledged;
//! - a fault thread keeps the mock's fault queue filled with a random mix of
//!   500/502/503, 429 with `Retry-After: 1`, slow answers (within and beyond
//!   `schematic.timeout`), dropped connections and normal answers;
//! - a supervisor thread SIGKILLs the daemon every 5-20 s (random) and starts
//!   it again on the same port; it also samples the daemon's VmHWM.
//!
//! At the end the clients stop, the faults are cleared, `audiences sync` is
//! run once more, and the daemon drains until no delivery is pending or in
//! flight (with a deadline). Then it checks that every acknowledged messageId
//! reached the mock (the daemon's SQLite gives each message's deliveries and
//! their idempotency keys; the mock must have seen every key), that the last
//! `soak_audience` value the mock received per user equals the desired state,
//! that no delivery is `failed` unless the mock answered it a permanent 4xx,
//! that the mock saw no wire-format violation, that the daemon never
//! panicked or exited by itself, and that it stops cleanly on SIGTERM.
//!
//! Audience order (SPEC 5, newest wins) is checked three ways: no older value
//! of a user reached the mock after a newer one (arrival order); no two
//! values of a user were in flight at once (the daemon's own
//! `delivery_attempts`); and the final value per user is the last one by
//! arrival. The mock records a `Delay`ed answer's events when it answers, so
//! a request the daemon gave up on (timeout) can land after the newer value
//! it sent next (or a request sent just before a kill can); such users are
//! counted and shown, not failed: with the two order checks passing, the
//! daemon had stopped waiting for that answer.
//!
//! Prints: messages acknowledged, delivered, duplicates seen by the mock,
//! kills survived, lost (must be 0), peak RSS. Exits 1 when a check fails;
//! the work folder (config, database, daemon log) is then kept and printed.
//!
//! Environment: `SOAK_SECONDS` (600), `SOAK_RATE` (200 messages/s in total),
//! `SOAK_CLIENTS` (4), `SOAK_AUDIENCE_USERS` (300), `SOAK_SEED` (random),
//! `SOAK_KEEP` (keep the work folder even when every check passes).

#[path = "../tests/support/mock_schematic.rs"]
mod mock_schematic;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use serde_json::{json, Value};

use mock_schematic::{Fault, MockSchematic};

const API_KEY: &str = "sch_soak_key_7f3a";
const WRITE_KEY: &str = "wk_soak_2b91";
const AUDIENCE: &str = "soak_audience";
/// The user trait Schematic gets for the audience (its key snake_cased).
const AUDIENCE_TRAIT: &str = "soak_audience";
/// `schematic.timeout` in the daemon's config.
const SCHEMATIC_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest `Fault::Delay` the fault thread injects.
const MAX_DELAY: Duration = Duration::from_millis(2500);
/// How long the final drain may take.
const DRAIN_DEADLINE: Duration = Duration::from_secs(180);
/// How long clients get to have their last request acknowledged at the end.
const CLIENT_STOP_DEADLINE: Duration = Duration::from_secs(60);
const EVENT_NAMES: [&str; 6] = [
    "Order Completed",
    "Page Viewed",
    "Signed Up",
    "Item Added",
    "Checkout Started",
    "Feature Used",
];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

struct Settings {
    seconds: u64,
    rate: f64,
    clients: usize,
    audience_users: usize,
    seed: u64,
    keep: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("soak: {name}={text:?} is not valid");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seed = env_or(
            "SOAK_SEED",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        );
        Settings {
            seconds: env_or("SOAK_SECONDS", 600),
            rate: env_or("SOAK_RATE", 200.0_f64).max(1.0),
            clients: env_or("SOAK_CLIENTS", 4_usize).max(1),
            audience_users: env_or("SOAK_AUDIENCE_USERS", 300_usize).max(1),
            seed,
            keep: std::env::var_os("SOAK_KEEP").is_some(),
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon: start on a fixed port, SIGKILL, restart, VmHWM.
// ---------------------------------------------------------------------------

struct Launcher {
    config_path: PathBuf,
    log_path: PathBuf,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Launcher {
    fn bin() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_schematic-sync"))
    }

    fn log_marker(&self, text: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(f, "===== soak: {text} at {} =====", Utc::now());
        }
    }

    /// Spawns `serve` with its stderr appended to the log file and waits
    /// until it accepts connections on the fixed port; retries a few times if
    /// it exits before that (say the port is still held).
    fn start(&self, what: &str) -> Result<(Child, Duration), String> {
        let began = Instant::now();
        for attempt in 1..=10 {
            self.log_marker(&format!("{what} (spawn attempt {attempt})"));
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|e| format!("open daemon log: {e}"))?;
            let mut child = Command::new(Self::bin())
                .arg("--config")
                .arg(&self.config_path)
                .arg("serve")
                .current_dir(&self.dir)
                .env("SCHEMATIC_API_KEY", API_KEY)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .map_err(|e| format!("spawn schematic-sync serve: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    self.log_marker(&format!("daemon exited during start: {status}"));
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
                if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                    return Ok((child, began.elapsed()));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the daemon did not listen on {} within 30 s",
                        self.addr
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(format!(
            "the daemon could not be started on {} (10 attempts)",
            self.addr
        ))
    }
}

/// The daemon's peak resident set size so far, in KiB (`VmHWM`).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Default)]
struct SupervisorReport {
    kills: usize,
    unexpected_exits: Vec<String>,
    peak_rss_kib: u64,
    restart_times: Vec<Duration>,
    error: Option<String>,
}

/// Kills the daemon at random moments and restarts it, until `stop`; hands
/// the running daemon back.
fn supervise(
    launcher: &Launcher,
    mut child: Child,
    stop: &AtomicBool,
    seed: u64,
) -> (Option<Child>, SupervisorReport) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = SupervisorReport::default();
    let next_kill_in = |rng: &mut StdRng| Duration::from_millis(rng.gen_range(5_000..=20_000));
    let mut next_kill = Instant::now() + next_kill_in(&mut rng);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(kib) = vm_hwm_kib(child.id()) {
            report.peak_rss_kib = report.peak_rss_kib.max(kib);
        }
        let exited = match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        };
        if let Some(status) = exited {
            let text = format!("the daemon exited by itself ({status}) at {}", Utc::now());
            eprintln!("soak: {text}; restarting it");
            report.unexpected_exits.push(text);
            match launcher.start("restart after an unexpected exit") {
                Ok((c, took)) => {
                    child = c;
                    report.restart_times.push(took);
                }
                Err(e) => {
                    report.error = Some(e);
                    return (None, report);
                }
            }
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            return (Some(child), report);
        }
        if Instant::now() >= next_kill {
            if let Some(kib) = vm_hwm_kib(child.id()) {
                report.peak_rss_kib = report.peak_rss_kib.max(kib);
            }
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            report.kills += 1;
            launcher.log_marker(&format!("SIGKILL #{}", report.kills));
            // sometimes stay down a little, so clients see refused connections
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
            match launcher.start(&format!("restart after SIGKILL #{}", report.kills)) {
                Ok((c, took)) => {
                    child = c;
                    report.restart_times.push(took);
                }
                Err(e) => {
                    report.error = Some(e);
                    return (None, report);
                }
            }
            next_kill = Instant::now() + next_kill_in(&mut rng);
        }
    }
}

// ---------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------

fn random_fault(rng: &mut StdRng) -> Fault {
    let roll = rng.gen_range(0..100);
    match roll {
        0..=47 => Fault::Status(200),
        48..=55 => Fault::Status(500),
        56..=60 => Fault::Status(502),
        61..=65 => Fault::Status(503),
        66..=73 => Fault::StatusWithRetryAfter(429, "1".into()),
        74..=81 => Fault::Delay(Duration::from_millis(rng.gen_range(
            SCHEMATIC_TIMEOUT.as_millis() as u64 + 200..=MAX_DELAY.as_millis() as u64,
        ))),
        82..=89 => Fault::Delay(Duration::from_millis(rng.gen_range(200..800))),
        _ => Fault::Drop,
    }
}

fn push_faults_until(mock: &MockSchematic, stop: &AtomicBool, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        if mock.pending_faults() < 10 {
            let faults: Vec<Fault> = (0..20).map(|_| random_fault(&mut rng)).collect();
            mock.push_faults(faults);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Track,
    Identify,
    Membership,
}

struct ClientShared {
    base: String,
    http: reqwest::Client,
    /// No new request after this.
    stop: AtomicBool,
    /// Stop retrying the request in hand (the end deadline passed).
    give_up: AtomicBool,
    per_client_rate: f64,
    nonce: String,
}

/// One request ready to send, and what it means once acknowledged.
struct Planned {
    route: &'static str,
    body: Value,
    messages: Vec<(String, Kind)>,
    membership: Vec<(String, bool)>,
}

#[derive(Default)]
struct ClientReport {
    acked: Vec<(String, Kind)>,
    desired: HashMap<String, bool>,
    requests_acked: u64,
    requests_by_route: BTreeMap<&'static str, u64>,
    failed_attempts: BTreeMap<String, u64>,
    /// 4xx answers: a bug in the client or the daemon; never retried.
    rejected: Vec<String>,
    /// Requests not acknowledged when the end deadline passed.
    abandoned: Vec<String>,
    /// Audience users whose state is unknown (a membership request abandoned).
    uncertain_users: Vec<String>,
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

struct ClientGen {
    id: usize,
    seq: u64,
    rng: StdRng,
    nonce: String,
    my_users: Vec<String>,
    /// Last value sent per own audience user (acknowledged or not yet).
    current: HashMap<String, bool>,
}

impl ClientGen {
    fn message_id(&mut self) -> String {
        self.seq += 1;
        format!("soak-{}-c{}-{}", self.nonce, self.id, self.seq)
    }

    fn user(&mut self) -> String {
        format!("user-{}", self.rng.gen_range(0..5000))
    }

    fn context(&mut self) -> Value {
        if self.rng.gen_bool(0.5) {
            json!({"groupId": format!("company-{}", self.rng.gen_range(0..200)), "library": {"name": "soak", "version": "1"}})
        } else {
            json!({"library": {"name": "soak", "version": "1"}})
        }
    }

    fn track(&mut self) -> (Value, String) {
        let id = self.message_id();
        let event = EVENT_NAMES[self.rng.gen_range(0..EVENT_NAMES.len())];
        let mut body = json!({
            "messageId": id,
            "userId": self.user(),
            "event": event,
            "properties": {"soak_seq": self.seq, "amount": self.rng.gen_range(1..500)},
            "context": self.context(),
        });
        if self.rng.gen_bool(0.5) {
            body["timestamp"] = json!(now_text());
        }
        (body, id)
    }

    fn identify(&mut self) -> (Value, String) {
        let id = self.message_id();
        let n = self.rng.gen_range(0..5000);
        let plan = PLANS[self.rng.gen_range(0..PLANS.len())];
        let body = json!({
            "messageId": id,
            "userId": format!("user-{n}"),
            "traits": {"name": format!("User {n}"), "plan": plan, "seats": self.rng.gen_range(1..50), "company_name": "Soak Inc"},
            "context": self.context(),
            "timestamp": now_text(),
        });
        (body, id)
    }

    /// A membership change for one of this client's audience users (not one
    /// of `exclude`), as an identify or an Entered/Exited track.
    fn membership(
        &mut self,
        exclude: &[String],
    ) -> Option<(Value, &'static str, String, String, bool)> {
        let candidates: Vec<&String> = self
            .my_users
            .iter()
            .filter(|u| !exclude.contains(u))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let user = candidates[self.rng.gen_range(0..candidates.len())].clone();
        let now = self.current.get(&user).copied().unwrap_or(false);
        // mostly flips, sometimes a repeat of the same value
        let member = if self.rng.gen_bool(0.85) { !now } else { now };
        self.current.insert(user.clone(), member);
        let id = self.message_id();
        let context = json!({"personas": {"computation_class": "audience", "computation_key": AUDIENCE, "computation_id": "aud_soak"}});
        let (body, kind) = if self.rng.gen_bool(0.5) {
            (
                json!({"messageId": id, "userId": user, "traits": {AUDIENCE: member}, "context": context, "timestamp": now_text()}),
                "identify",
            )
        } else {
            let event = if member {
                "Audience Entered"
            } else {
                "Audience Exited"
            };
            (
                json!({"messageId": id, "userId": user, "event": event, "properties": {AUDIENCE: member, "audience_key": AUDIENCE}, "context": context, "timestamp": now_text()}),
                "track",
            )
        };
        Some((body, kind, id, user, member))
    }

    fn plan(&mut self) -> Planned {
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=39 => {
                let (body, id) = self.track();
                Planned {
                    route: "/v1/track",
                    body,
                    messages: vec![(id, Kind::Track)],
                    membership: vec![],
                }
            }
            40..=64 => {
                let (body, id) = self.identify();
                Planned {
                    route: "/v1/identify",
                    body,
                    messages: vec![(id, Kind::Identify)],
                    membership: vec![],
                }
            }
            65..=84 => match self.membership(&[]) {
                Some((body, kind, id, user, member)) => Planned {
                    route: if kind == "identify" {
                        "/v1/identify"
                    } else {
                        "/v1/track"
                    },
                    body,
                    messages: vec![(id, Kind::Membership)],
                    membership: vec![(user, member)],
                },
                None => self.plan(),
            },
            _ => self.batch(),
        }
    }

    fn batch(&mut self) -> Planned {
        let n = self.rng.gen_range(2..=25);
        let mut items = Vec::with_capacity(n + 3);
        let mut messages = Vec::with_capacity(n + 3);
        let mut membership: Vec<(String, bool)> = Vec::new();
        for _ in 0..n {
            if self.rng.gen_bool(0.6) {
                let (mut body, id) = self.track();
                body["type"] = json!("track");
                if body.get("timestamp").is_none() {
                    // Segment libraries send originalTimestamp and sentAt
                    body["originalTimestamp"] = json!(now_text());
                }
                items.push(body);
                messages.push((id, Kind::Track));
            } else {
                let (mut body, id) = self.identify();
                body["type"] = json!("identify");
                items.push(body);
                messages.push((id, Kind::Identify));
            }
        }
        if self.rng.gen_bool(0.3) {
            for _ in 0..self.rng.gen_range(1..=3) {
                let exclude: Vec<String> = membership.iter().map(|(u, _)| u.clone()).collect();
                if let Some((mut body, kind, id, user, member)) = self.membership(&exclude) {
                    body["type"] = json!(kind);
                    let at = self.rng.gen_range(0..=items.len());
                    items.insert(at, body);
                    messages.push((id, Kind::Membership));
                    membership.push((user, member));
                }
            }
        }
        Planned {
            route: "/v1/batch",
            body: json!({"batch": items, "sentAt": now_text(), "context": {"ip": "127.0.0.1"}}),
            messages,
            membership,
        }
    }
}

async fn run_client(
    id: usize,
    shared: Arc<ClientShared>,
    my_users: Vec<String>,
    seed: u64,
) -> ClientReport {
    let mut gen = ClientGen {
        id,
        seq: 0,
        rng: StdRng::seed_from_u64(seed),
        nonce: shared.nonce.clone(),
        my_users,
        current: HashMap::new(),
    };
    let mut report = ClientReport::default();
    let mut next_at = tokio::time::Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        let planned = gen.plan();
        // pace: n messages take n / rate seconds of this client's budget
        let now = tokio::time::Instant::now();
        if next_at > now {
            tokio::time::sleep_until(next_at).await;
        } else if now - next_at > Duration::from_secs(1) {
            next_at = now; // do not burst to catch up after an outage
        }
        next_at += Duration::from_secs_f64(planned.messages.len() as f64 / shared.per_client_rate);
        let body = planned.body.to_string();
        let acked = loop {
            if shared.give_up.load(Ordering::SeqCst) {
                break false;
            }
            let result = shared
                .http
                .post(format!("{}{}", shared.base, planned.route))
                .basic_auth(WRITE_KEY, Some(""))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let failure = match result {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap_or_default();
                    let ok = serde_json::from_str::<Value>(&text)
                        .map(|v| v == json!({"success": true}))
                        .unwrap_or(false);
                    if status == 200 && ok {
                        break true;
                    }
                    if (400..500).contains(&status) {
                        report.rejected.push(format!(
                            "{} {status}: {text} (first messageId {})",
                            planned.route, planned.messages[0].0
                        ));
                        break false;
                    }
                    if status == 200 {
                        format!("200 with body {text}")
                    } else {
                        format!("HTTP {status}")
                    }
                }
                Err(e) if e.is_timeout() => "timeout".to_string(),
                Err(e) if e.is_connect() => "connection refused/failed".to_string(),
                Err(_) => "connection error".to_string(),
            };
            *report.failed_attempts.entry(failure).or_default() += 1;
            let pause = gen.rng.gen_range(100..300);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        };
        if acked {
            report.requests_acked += 1;
            *report.requests_by_route.entry(planned.route).or_default() += 1;
            report.acked.extend(planned.messages);
            for (user, member) in planned.membership {
                report.desired.insert(user, member);
            }
        } else if shared.give_up.load(Ordering::SeqCst) {
            report.abandoned.push(planned.messages[0].0.clone());
            report
                .uncertain_users
                .extend(planned.membership.into_iter().map(|(u, _)| u));
            break;
        } else {
            // rejected (4xx): nothing of it was stored; the users keep their
            // last acknowledged state
            for (user, _) in &planned.membership {
                match report.desired.get(user) {
                    Some(v) => gen.current.insert(user.clone(), *v),
                    None => gen.current.remove(user),
                };
            }
        }
    }
    report
}

// ---------------------------------------------------------------------------
// End: settle, then read the store and the mock.
// ---------------------------------------------------------------------------

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
}

const UNSETTLED_SQL: &str = "SELECT
    (SELECT count(*) FROM deliveries WHERE state IN ('pending', 'in_flight'))
  + (SELECT count(*) FROM events WHERE status = 'received')
  + (SELECT count(*) FROM audience_members
     WHERE (desired = 1 AND synced IS NOT 1) OR (desired = 0 AND synced = 1))";

fn run_cli(launcher: &Launcher, args: &[&str]) -> (Option<i32>, String) {
    match Command::new(Launcher::bin())
        .arg("--config")
        .arg(&launcher.config_path)
        .args(args)
        .current_dir(&launcher.dir)
        .env("SCHEMATIC_API_KEY", API_KEY)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
    {
        Ok(out) => (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (None, format!("cannot run {args:?}: {e}")),
    }
}

fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr")
}

struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        println!("check: {} {what}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.0.push(what);
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    let settings = Settings::from_env();
    let nonce = format!("{:x}", settings.seed & 0xffff_ffff);
    let work = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("soak")
        .join(format!("run-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create the soak work folder");
    let db_path = work.join("soak.db");
    let addr = free_port();
    let mock = MockSchematic::start(API_KEY);
    let config_path = work.join("config.toml");
    let config = format!(
        r#"[store]
path = {db:?}

[server]
listen = "{addr}"
write_keys = ["{WRITE_KEY}"]
shutdown_timeout = "5s"

[schematic]
capture_url = {url:?}
timeout = "1s"
batch_size = 100
concurrency = 4

[delivery]
schedule = "* * * * * *"
backoff_base = "100ms"
backoff_max = "2s"
lease = "3s"

[audiences]
schedule = "*/3 * * * * *"

[log]
level = "info"
"#,
        db = db_path.display().to_string(),
        url = mock.url(),
    );
    std::fs::write(&config_path, config).expect("write the soak config");
    let launcher = Launcher {
        config_path,
        log_path: work.join("daemon.log"),
        dir: work.clone(),
        addr,
    };
    println!(
        "soak: {} s, {} messages/s from {} clients, {} audience users, seed {}, daemon on {addr}, mock on {}, work folder {}",
        settings.seconds,
        settings.rate,
        settings.clients,
        settings.audience_users,
        settings.seed,
        mock.url(),
        work.display()
    );

    let (child, first_start) = match launcher.start("first start") {
        Ok(started) => started,
        Err(e) => {
            eprintln!("soak: {e}; log in {}", launcher.log_path.display());
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let mut master = StdRng::seed_from_u64(settings.seed);

    // faults
    let fault_stop = Arc::new(AtomicBool::new(false));
    let mock = Arc::new(mock);
    let fault_thread = {
        let stop = fault_stop.clone();
        let seed = master.gen();
        let mock = mock.clone();
        std::thread::spawn(move || push_faults_until(&mock, &stop, seed))
    };

    // kills
    let kill_stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let stop = kill_stop.clone();
        let seed = master.gen();
        let launcher = Launcher {
            config_path: launcher.config_path.clone(),
            log_path: launcher.log_path.clone(),
            dir: launcher.dir.clone(),
            addr,
        };
        std::thread::spawn(move || supervise(&launcher, child, &stop, seed))
    };

    // clients
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let shared = Arc::new(ClientShared {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("http client"),
        stop: AtomicBool::new(false),
        give_up: AtomicBool::new(false),
        per_client_rate: settings.rate / settings.clients as f64,
        nonce: nonce.clone(),
    });
    let audience_users: Vec<String> = (0..settings.audience_users)
        .map(|i| format!("aud-user-{i:04}"))
        .collect();
    let clients: Vec<_> = (0..settings.clients)
        .map(|c| {
            let mine: Vec<String> = audience_users
                .iter()
                .enumerate()
                .filter(|(i, _)| i % settings.clients == c)
                .map(|(_, u)| u.clone())
                .collect();
            runtime.spawn(run_client(c, shared.clone(), mine, master.gen()))
        })
        .collect();

    // run, with a progress line every 10 s
    let total = Duration::from_secs(settings.seconds);
    let mut last_progress = Instant::now();
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_millis(200));
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let (delivered, pending) = open_db(&db_path)
                .map(|c| {
                    (
                        count(&c, "SELECT count(*) FROM deliveries WHERE state = 'delivered'"),
                        count(
                            &c,
                            "SELECT count(*) FROM deliveries WHERE state IN ('pending','in_flight')",
                        ),
                    )
                })
                .unwrap_or((-1, -1));
            println!(
                "soak: {:>4} s: deliveries delivered {delivered}, pending or in flight {pending}",
                started.elapsed().as_secs()
            );
        }
    }

    // stop the kills first, so the daemon is up while clients finish
    kill_stop.store(true, Ordering::SeqCst);
    let (child, mut sup) = supervisor.join().expect("supervisor thread");
    sup.restart_times.insert(0, first_start);
    let Some(mut child) = child else {
        eprintln!(
            "soak: {}; log in {}",
            sup.error.unwrap_or_default(),
            launcher.log_path.display()
        );
        std::process::exit(1);
    };
    shared.stop.store(true, Ordering::SeqCst);
    let reports: Vec<ClientReport> = runtime.block_on(async {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + CLIENT_STOP_DEADLINE;
        for handle in clients {
            let mut handle = handle;
            let report = match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(r) => r,
                Err(_) => {
                    shared.give_up.store(true, Ordering::SeqCst);
                    handle.await
                }
            };
            out.push(report.expect("client task"));
        }
        out
    });
    let send_seconds = started.elapsed().as_secs_f64();
    fault_stop.store(true, Ordering::SeqCst);
    fault_thread.join().expect("fault thread");
    mock.clear_faults();

    // one more sync after the last message, then drain
    let (code, out) = run_cli(&launcher, &["audiences", "sync"]);
    println!(
        "soak: final `audiences sync` (exit {code:?}): {}",
        out.trim()
    );
    let drain_started = Instant::now();
    let mut settled = false;
    let mut peak_rss_kib = sup.peak_rss_kib;
    while drain_started.elapsed() < DRAIN_DEADLINE {
        if let Some(kib) = vm_hwm_kib(child.id()) {
            peak_rss_kib = peak_rss_kib.max(kib);
        }
        if let Ok(Some(status)) = child.try_wait() {
            sup.unexpected_exits.push(format!(
                "the daemon exited by itself during the final drain ({status})"
            ));
            break;
        }
        if open_db(&db_path)
            .map(|c| count(&c, UNSETTLED_SQL))
            .unwrap_or(-1)
            == 0
        {
            settled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let drain_took = drain_started.elapsed();
    // answers held back by a Delay fault still land at the mock
    std::thread::sleep(MAX_DELAY + Duration::from_millis(500));
    if let Some(kib) = vm_hwm_kib(child.id()) {
        peak_rss_kib = peak_rss_kib.max(kib);
    }
    let exit = terminate(&mut child, Duration::from_secs(20));

    // ---- checks ----
    let mut failures = Failures(Vec::new());
    let conn = open_db(&db_path).expect("open the soak database");
    let events = mock.events();
    let unique = mock.unique_events().len();
    let requests = mock.requests();
    let mock_keys: HashSet<&str> = events
        .iter()
        .filter_map(|e| e["idempotency_key"].as_str())
        .collect();

    // every stored message with its deliveries
    struct Stored {
        status: String,
        deliveries: Vec<(i64, String, String)>,
    }
    let mut stored: HashMap<String, Stored> = HashMap::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT e.message_id, e.status, d.id, d.idempotency_key, d.state
                 FROM events e LEFT JOIN deliveries d ON d.event_id = e.id",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .expect("query");
        for row in rows {
            let (message_id, status, id, key, state) = row.expect("row");
            let entry = stored.entry(message_id).or_insert_with(|| Stored {
                status,
                deliveries: Vec::new(),
            });
            if let (Some(id), Some(key), Some(state)) = (id, key, state) {
                entry.deliveries.push((id, key, state));
            }
        }
    }

    let mut acked: Vec<(String, Kind)> = Vec::new();
    let mut desired: HashMap<String, bool> = HashMap::new();
    let mut uncertain: HashSet<String> = HashSet::new();
    let mut rejected = Vec::new();
    let mut abandoned = Vec::new();
    let mut failed_attempts: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_route: BTreeMap<&str, u64> = BTreeMap::new();
    let mut requests_acked = 0;
    for r in reports {
        acked.extend(r.acked);
        desired.extend(r.desired);
        uncertain.extend(r.uncertain_users);
        rejected.extend(r.rejected);
        abandoned.extend(r.abandoned);
        requests_acked += r.requests_acked;
        for (k, v) in r.failed_attempts {
            *failed_attempts.entry(k).or_default() += v;
        }
        for (k, v) in r.requests_by_route {
            *by_route.entry(k).or_default() += v;
        }
    }
    let kinds = |k: Kind| acked.iter().filter(|(_, kind)| *kind == k).count();
    let mut delivered = 0usize;
    let mut lost: Vec<String> = Vec::new();
    let mut membership_not_recorded: Vec<String> = Vec::new();
    for (id, kind) in &acked {
        let Some(s) = stored.get(id) else {
            lost.push(format!(
                "{id} ({kind:?}): acknowledged but not in the events table"
            ));
            continue;
        };
        if *kind == Kind::Membership {
            if s.status != "membership" {
                membership_not_recorded.push(format!("{id}: status {}", s.status));
            }
            continue;
        }
        let missing: Vec<String> = s
            .deliveries
            .iter()
            .filter(|(_, key, _)| !mock_keys.contains(key.as_str()))
            .map(|(d, key, state)| format!("delivery {d} ({state}, key {key})"))
            .collect();
        if s.status != "mapped" || s.deliveries.is_empty() {
            lost.push(format!(
                "{id} ({kind:?}): event status {} with {} deliveries",
                s.status,
                s.deliveries.len()
            ));
        } else if !missing.is_empty() {
            lost.push(format!(
                "{id} ({kind:?}): not at the mock: {}",
                missing.join(", ")
            ));
        } else {
            delivered += 1;
        }
    }

    // audience: the last value the mock received per user, in the order the
    // requests reached it (the order Schematic takes them in), and in the
    // order the mock answered them (`events()`), which differs only where a
    // `Delay` fault held an answer back
    let mut last_answered: HashMap<String, (bool, String)> = HashMap::new();
    let mut history: HashMap<String, Vec<bool>> = HashMap::new();
    for e in &events {
        if let (Some(user), Some(v)) = (
            e["body"]["keys"]["userId"].as_str(),
            e["body"]["traits"][AUDIENCE_TRAIT].as_bool(),
        ) {
            let key = e["idempotency_key"].as_str().unwrap_or_default();
            last_answered.insert(user.to_string(), (v, key.to_string()));
            history.entry(user.to_string()).or_default().push(v);
        }
    }
    let mut by_arrival: Vec<&mock_schematic::ReceivedRequest> = requests
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .collect();
    by_arrival.sort_by_key(|r| r.at);
    let mut last_arrived: HashMap<String, bool> = HashMap::new();
    for r in by_arrival {
        for e in r.events() {
            if let (Some(user), Some(v)) = (
                e["body"]["keys"]["userId"].as_str(),
                e["body"]["traits"][AUDIENCE_TRAIT].as_bool(),
            ) {
                last_arrived.insert(user.to_string(), v);
            }
        }
    }
    let db_desired: HashMap<String, (bool, Option<bool>)> = {
        let mut stmt = conn
            .prepare(
                "SELECT user_id, desired, synced FROM audience_members WHERE audience_key = ?1",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([AUDIENCE], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (
                        r.get::<_, i64>(1)? == 1,
                        r.get::<_, Option<i64>>(2)?.map(|s| s == 1),
                    ),
                ))
            })
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    // newest wins (SPEC 5): an older value of a pair must never be sent
    // after a newer one (the order requests reached the mock, whatever it
    // answered); and, for information, older values that landed after newer
    // ones in the mock's answer order (only a `Delay` fault beyond
    // `schematic.timeout` can do that: the daemon had given up on the request)
    let pair_ids: HashMap<String, (i64, String)> = {
        let mut stmt = conn
            .prepare("SELECT idempotency_key, id, user_id FROM deliveries WHERE audience_key = ?1")
            .expect("prepare");
        let rows = stmt
            .query_map([AUDIENCE], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    let mut all_by_arrival: Vec<&mock_schematic::ReceivedRequest> = requests.iter().collect();
    all_by_arrival.sort_by_key(|r| r.at);
    let mut newest_sent: HashMap<&str, i64> = HashMap::new();
    let mut sent_out_of_order: Vec<String> = Vec::new();
    for r in all_by_arrival {
        for e in r.events() {
            let Some((id, user)) = e["idempotency_key"].as_str().and_then(|k| pair_ids.get(k))
            else {
                continue;
            };
            let newest = newest_sent.entry(user.as_str()).or_insert(*id);
            if *id < *newest {
                sent_out_of_order.push(format!(
                    "{user}: delivery {id} reached the mock at {} (answered {}) after delivery {newest}",
                    r.at_utc, r.status
                ));
            }
            *newest = (*newest).max(*id);
        }
    }
    let mut newest_landed: HashMap<&str, i64> = HashMap::new();
    let mut landed_out_of_order: Vec<(String, i64, i64)> = Vec::new();
    for e in &events {
        let Some((id, user)) = e["idempotency_key"].as_str().and_then(|k| pair_ids.get(k)) else {
            continue;
        };
        let newest = newest_landed.entry(user.as_str()).or_insert(*id);
        if *id < *newest {
            landed_out_of_order.push((user.clone(), *id, *newest));
        }
        *newest = (*newest).max(*id);
    }
    // the older value's attempts show why: a timeout means the daemon had
    // given up on the request the mock answered late
    let landed_details: Vec<String> = landed_out_of_order
        .iter()
        .take(5)
        .map(|(user, old, new)| {
            let mut stmt = conn
                .prepare(
                    "SELECT attempted_at, coalesce(status, 0), coalesce(error, ''), duration_ms
                     FROM delivery_attempts WHERE delivery_id = ?1 ORDER BY id",
                )
                .expect("prepare");
            let attempts: Vec<String> = stmt
                .query_map([old], |r| {
                    Ok(format!(
                        "[{} status {} {} ms {}]",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(2)?
                    ))
                })
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            format!(
                "{user}: delivery {old} answered after delivery {new}; attempts of {old}: {}",
                attempts.join(" ")
            )
        })
        .collect();
    // ... and never two values of one pair in flight at once: the daemon's
    // own attempt history (an attempt spans `duration_ms` up to
    // `attempted_at`) shows no overlap between deliveries of one pair
    let overlapping: Vec<String> = {
        let mut stmt = conn
            .prepare(
                "SELECT da.user_id, a.delivery_id, a.attempted_at, a.duration_ms,
                        b.delivery_id, b.attempted_at, b.duration_ms
                 FROM deliveries da
                 JOIN delivery_attempts a ON a.delivery_id = da.id
                 JOIN deliveries db ON db.audience_key = da.audience_key
                      AND db.user_id = da.user_id AND db.id > da.id
                 JOIN delivery_attempts b ON b.delivery_id = db.id
                 WHERE da.audience_key = ?1
                   AND julianday(a.attempted_at) - a.duration_ms / 86400000.0 < julianday(b.attempted_at)
                   AND julianday(b.attempted_at) - b.duration_ms / 86400000.0 < julianday(a.attempted_at)
                 ORDER BY a.attempted_at",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([AUDIENCE], |r| {
                Ok(format!(
                    "{}: delivery {} (attempt of {} ms ending {}) and delivery {} (attempt of {} ms ending {})",
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    let mut stale: Vec<String> = Vec::new();
    // stale only in the mock's answer order, and whether the late value's
    // delivery timed out (the daemon gave up on that request, then sent the
    // newer value, and the mock answered the old request afterwards)
    let mut stale_answer_only: Vec<(String, bool)> = Vec::new();
    let mut db_mismatch: Vec<String> = Vec::new();
    for user in &audience_users {
        if uncertain.contains(user) {
            continue;
        }
        let want = desired.get(user).copied();
        let want_member = want.unwrap_or(false);
        if want.is_some() {
            let db = db_desired.get(user).map(|(d, _)| *d);
            if db != want {
                db_mismatch.push(format!(
                    "{user}: acknowledged last {want:?}, store desired {db:?}"
                ));
            }
        }
        if last_arrived.get(user).copied().unwrap_or(false) != want_member {
            stale.push(user.clone());
        } else if let Some((value, key)) = last_answered.get(user) {
            if *value != want_member {
                let abandoned = pair_ids.get(key).is_some_and(|(id, _)| {
                    count(
                        &conn,
                        &format!(
                            "SELECT count(*) FROM delivery_attempts
                             WHERE delivery_id = {id} AND error LIKE 'no answer within%'"
                        ),
                    ) > 0
                });
                stale_answer_only.push((user.clone(), abandoned));
            }
        }
    }
    let stale_details: Vec<String> = stale
        .iter()
        .chain(stale_answer_only.iter().map(|(u, _)| u))
        .take(10)
        .map(|user| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, state, attempts, coalesce(last_status, -1), coalesce(last_error, ''),
                            json_extract(payload, '$.body.traits.soak_audience'), created_at,
                            coalesce(delivered_at, ''), sync_run_id
                     FROM deliveries WHERE audience_key = ?1 AND user_id = ?2 ORDER BY id",
                )
                .expect("prepare");
            let rows: Vec<String> = stmt
                .query_map([AUDIENCE, user.as_str()], |r| {
                    Ok(format!(
                        "[id {} {} attempts {} last_status {} value {} run {} created {} delivered {} err {:?}]",
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(8)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            format!(
                "{user}: desired {:?}, store {:?}, mock values in answer order {:?}, last by arrival {:?}; deliveries {}",
                desired.get(user),
                db_desired.get(user),
                history.get(user),
                last_arrived.get(user),
                rows.join(" ")
            )
        })
        .collect();

    let failed: Vec<(i64, Option<i64>, String)> = {
        let mut stmt = conn
            .prepare(
                "SELECT id, last_status, coalesce(last_error, '') || ' ' || coalesce(last_response, '')
                 FROM deliveries WHERE state = 'failed' ORDER BY id",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    let (permanent, not_permanent): (Vec<_>, Vec<_>) = failed
        .iter()
        .partition(|(_, status, _)| matches!(status, Some(400 | 404 | 413 | 422)));
    let states: Vec<(String, i64)> = {
        let mut stmt = conn
            .prepare("SELECT state, count(*) FROM deliveries GROUP BY state ORDER BY state")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    let log = std::fs::read_to_string(&launcher.log_path).unwrap_or_default();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    let error_lines = log.lines().filter(|l| l.contains(" ERROR ")).count();
    let violations = mock.violations();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let name = if r.status == 0 {
            "dropped".to_string()
        } else {
            r.status.to_string()
        };
        *answers.entry(name).or_default() += 1;
    }

    println!();
    println!(
        "soak: sent for {send_seconds:.0} s; {requests_acked} requests acknowledged {by_route:?}; failed attempts (retried) {failed_attempts:?}"
    );
    println!(
        "soak: mock got {} requests, answers {answers:?}; {} events answered 2xx, {unique} unique",
        requests.len(),
        events.len()
    );
    println!("soak: deliveries by state at the end {states:?}");
    println!(
        "soak: final drain {} in {:.1} s; daemon (re)start times: max {:.2} s; ERROR log lines: {error_lines}",
        if settled { "settled" } else { "DID NOT settle" },
        drain_took.as_secs_f64(),
        sup.restart_times
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
    );
    println!(
        "soak: audience: {} users with an acknowledged state, {} members desired; at the mock {} users stale, {} more only in the mock's answer order (a request the daemon gave up on after schematic.timeout answered after the newer value)",
        desired.len(),
        desired.values().filter(|v| **v).count(),
        stale.len(),
        stale_answer_only.len()
    );
    if !permanent.is_empty() {
        println!(
            "soak: {} deliveries failed on a permanent 4xx (counted as permanently rejected): {:?}",
            permanent.len(),
            permanent.iter().take(10).collect::<Vec<_>>()
        );
    }
    println!();
    let lost_count = lost.len();
    println!(
        "messages acknowledged: {} ({} tracks, {} identifies, {} audience membership)",
        acked.len(),
        kinds(Kind::Track),
        kinds(Kind::Identify),
        kinds(Kind::Membership)
    );
    println!(
        "delivered: {delivered} (of {} acknowledged tracks and identifies; membership is checked as the final audience state)",
        kinds(Kind::Track) + kinds(Kind::Identify)
    );
    println!("duplicates seen by the mock: {}", events.len() - unique);
    println!("kills survived: {}", sup.kills);
    println!("lost: {lost_count}");
    println!("peak RSS: {}", mib(peak_rss_kib));
    println!();

    failures.check(lost_count == 0, format!("lost = 0 (got {lost_count})"));
    for l in lost.iter().take(20) {
        println!("  lost: {l}");
    }
    failures.check(
        settled,
        format!(
            "queue drained within {} s (unsettled rows: {})",
            DRAIN_DEADLINE.as_secs(),
            open_db(&db_path)
                .map(|c| count(&c, UNSETTLED_SQL))
                .unwrap_or(-1)
        ),
    );
    failures.check(
        membership_not_recorded.is_empty(),
        format!(
            "membership messages stored as membership ({} not: {:?})",
            membership_not_recorded.len(),
            membership_not_recorded.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        db_mismatch.is_empty(),
        format!(
            "store's desired audience state = last acknowledged value ({} differ: {:?})",
            db_mismatch.len(),
            db_mismatch.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        sent_out_of_order.is_empty(),
        format!(
            "newest wins: no older audience value sent after a newer one of the same user ({} were; {} landed out of order in the mock's answer order)",
            sent_out_of_order.len(),
            landed_out_of_order.len()
        ),
    );
    for d in &landed_details {
        println!("  answered out of order: {d}");
    }
    for d in sent_out_of_order.iter().take(10) {
        println!("  out of order: {d}");
    }
    failures.check(
        overlapping.is_empty(),
        format!(
            "never two values of one (audience, user) in flight at once ({} overlapping attempts)",
            overlapping.len()
        ),
    );
    for d in overlapping.iter().take(10) {
        println!("  in flight together: {d}");
    }
    failures.check(
        stale.is_empty(),
        format!(
            "final audience trait at the mock (last value by arrival) = desired state for every user ({} stale)",
            stale.len()
        ),
    );
    if !stale_answer_only.is_empty() {
        // not a failure: with the two order checks above passing, the daemon
        // waited for no answer of that request (it timed out, or the daemon
        // was killed), and Schematic takes requests in the order they come
        let timed_out = stale_answer_only.iter().filter(|(_, t)| *t).count();
        println!(
            "note: {} users end with an older value in the mock's answer order only: the mock answered late a request the daemon had given up on ({timed_out} after schematic.timeout, {} sent before a kill); {:?}",
            stale_answer_only.len(),
            stale_answer_only.len() - timed_out,
            stale_answer_only.iter().take(10).map(|(u, _)| u).collect::<Vec<_>>()
        );
    }
    for d in &stale_details {
        println!("  audience detail: {d}");
    }
    failures.check(
        not_permanent.is_empty(),
        format!(
            "no failed delivery without a permanent rejection ({} failed: {:?})",
            not_permanent.len(),
            not_permanent.iter().take(10).collect::<Vec<_>>()
        ),
    );
    failures.check(
        violations.is_empty(),
        format!(
            "no wire-format violation at the mock ({}: {:?})",
            violations.len(),
            violations.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        panics.is_empty(),
        format!(
            "no panic in the daemon log ({:?})",
            panics.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        sup.unexpected_exits.is_empty(),
        format!(
            "the daemon never exited by itself ({:?})",
            sup.unexpected_exits
        ),
    );
    failures.check(
        rejected.is_empty(),
        format!(
            "no ingest request rejected with a 4xx ({}: {:?})",
            rejected.len(),
            rejected.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        abandoned.is_empty(),
        format!(
            "every client's last request acknowledged at the end ({} abandoned: {:?})",
            abandoned.len(),
            abandoned.iter().take(5).collect::<Vec<_>>()
        ),
    );
    failures.check(
        exit.is_some_and(|s| s.success()),
        format!("SIGTERM at the end stops the daemon with exit 0 (got {exit:?})"),
    );

    drop(conn);
    if failures.0.is_empty() {
        println!("soak: PASS");
        if !settings.keep {
            let _ = std::fs::remove_dir_all(&work);
        }
    } else {
        println!(
            "soak: FAIL ({} checks); work folder kept: {} (daemon log: {})",
            failures.0.len(),
            work.display(),
            launcher.log_path.display()
        );
        std::process::exit(1);
    }
}
