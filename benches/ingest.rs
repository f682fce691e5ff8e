//! Ingest benchmark (`cargo bench --bench ingest`).
//!
//! Starts the real daemon (`schematic-sync serve`, `synchronous = "full"`) on
//! a loopback port, lets N concurrent clients post `/v1/batch` requests of
//! realistic Segment events to it, and counts only the events of `200`
//! answers. Then, in the same run, it measures the ceiling: as many rows as
//! the daemon stored, from the same events (built with `segment::prepare` +
//! `EventRow::new`, outside the timed part), inserted with
//! `store::events::insert_committed` (the daemon's deduplication included)
//! into a new SQLite file opened through the crate's own `Store` and tuned by
//! `ingest::commit::tune_writer` (so the pragmas are those of the daemon's
//! ingest writer), 1,000 rows a transaction.
//!
//! Printed: acknowledged events/s, request latency, peak RSS (`VmHWM`), CPU
//! per daemon thread, daemon I/O per event, how busy the rest of the machine
//! was (the figures mean little when something else is using the cores), the
//! `events` row count against the acknowledged count, the ceiling, the ratio
//! and PASS/FAIL against the targets. Figures are printed, never asserted.
//!
//! Environment: `BENCH_CLIENTS` (8), `BENCH_SECONDS` (10), `BENCH_BATCH`
//! (100), `BENCH_WARMUP` (2 seconds), `BENCH_CLIENT_THREADS` (1),
//! `BENCH_CEILING_TX` (1000 rows per ceiling transaction),
//! `BENCH_MESSAGE_IDS` (`uuid`, random v4-style ids as analytics.js and the
//! mobile libraries send; or `node`, `node-next-<ms>-<uuid>` as
//! analytics-node sends, which sort by time), `BENCH_DELIVERY_SCHEDULE`
//! (unset: the daemon's default `delivery.schedule`, so the mapper runs
//! during the load as it would in production; e.g. `"0 0 0 1 1 *"` leaves
//! ingest alone).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::Utc;
use serde_json::{json, Value};

use schematic_sync::config::{StoreConfig, Synchronous};
use schematic_sync::segment::{self, Envelope};
use schematic_sync::store::dedupe::Dedupe;
use schematic_sync::store::events::{self, EventRow};
use schematic_sync::store::Store;

const WRITE_KEY: &str = "wk_bench_3f9a1c";
const SENT_AT: &str = "2025-06-02T09:15:30.250Z";
/// Distinct request bodies each client cycles through.
const TEMPLATES_PER_CLIENT: usize = 4;
/// messageId counters of the ceiling rows start here (clients use `c << 40`).
const CEILING_ID_BASE: u64 = 1 << 60;

const TARGET_EVENTS_PER_SEC: f64 = 50_000.0;
const TARGET_RATIO: f64 = 0.25;
const TARGET_RSS_MB: f64 = 100.0;

struct Settings {
    clients: usize,
    seconds: f64,
    batch: usize,
    warmup: f64,
    client_threads: usize,
    ceiling_tx: usize,
    ids: IdStyle,
    delivery_schedule: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        _ => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let s = Settings {
            clients: env_or("BENCH_CLIENTS", 8usize).max(1),
            seconds: env_or("BENCH_SECONDS", 10.0f64).max(0.5),
            batch: env_or("BENCH_BATCH", 100usize).max(1),
            warmup: env_or("BENCH_WARMUP", 2.0f64).max(0.0),
            client_threads: env_or("BENCH_CLIENT_THREADS", 1usize).max(1),
            ceiling_tx: env_or("BENCH_CEILING_TX", 1000usize).max(1),
            ids: match std::env::var("BENCH_MESSAGE_IDS")
                .unwrap_or_default()
                .trim()
            {
                "" | "uuid" => IdStyle::Uuid,
                "node" => IdStyle::Node,
                other => panic!("BENCH_MESSAGE_IDS={other:?}: expected uuid or node"),
            },
            delivery_schedule: std::env::var("BENCH_DELIVERY_SCHEDULE")
                .ok()
                .filter(|s| !s.trim().is_empty()),
        };
        assert!(s.clients < (1 << 19), "BENCH_CLIENTS is too large");
        s
    }
}

// ---------------------------------------------------------------------------
// Realistic events
// ---------------------------------------------------------------------------

/// A small deterministic generator (splitmix64) so runs are comparable.
struct Rng(u64);

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    fn uuid(&mut self) -> String {
        uuid_text(self.next(), self.next())
    }
}

/// A UUID-shaped text; unique per `hi` because splitmix64 is a bijection.
fn uuid_text(hi: u64, lo: u64) -> String {
    let h = format!("{hi:016x}{lo:016x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// How the clients make messageIds; every id is unique per counter `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdStyle {
    /// Random-looking UUIDs (analytics.js, mobile libraries). (While
    /// deduplication used a unique index on messageId, these landed all
    /// over it; the store now only appends, whatever the ids.)
    Uuid,
    /// `node-next-<unix ms>-<uuid>` (analytics-node), which sort by time.
    Node,
}

impl IdStyle {
    /// Stands for a messageId in the serialized templates, same length as
    /// the ids written over it.
    fn placeholder(self) -> &'static str {
        match self {
            IdStyle::Uuid => "ffffffff-ffff-ffff-ffff-ffffffffffff",
            IdStyle::Node => "node-next-9999999999999-ffffffff-ffff-ffff-ffff-ffffffffffff",
        }
    }

    fn name(self) -> &'static str {
        match self {
            IdStyle::Uuid => "random UUIDs",
            IdStyle::Node => "time-ordered node-next-<ms>-<uuid>",
        }
    }

    /// The messageId of counter `n`.
    fn message_id(self, n: u64) -> String {
        let uuid = uuid_text(splitmix64(n), splitmix64(n ^ 0x5bd1_e995));
        match self {
            IdStyle::Uuid => uuid,
            IdStyle::Node => {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                format!("node-next-{ms:013}-{uuid}")
            }
        }
    }
}

const PAGES: &[(&str, &str)] = &[
    ("/dashboard", "Dashboard"),
    ("/settings/billing", "Billing settings"),
    ("/reports/weekly-active-users", "Weekly active users"),
    ("/checkout/complete", "Thank you for your order"),
    ("/integrations/salesforce", "Salesforce integration"),
];
const REFERRERS: &[&str] = &[
    "https://www.google.com/",
    "https://app.acme-analytics.io/dashboard",
    "https://news.ycombinator.com/",
    "",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:126.0) Gecko/20100101 Firefox/126.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
];
const LOCALES: &[&str] = &["en-US", "de-DE", "fr-FR", "en-GB", "ja-JP"];
const PLANS: &[&str] = &["free", "starter", "growth", "enterprise"];
const FEATURES: &[&str] = &[
    "csv-export",
    "sso",
    "custom-dashboards",
    "audit-log",
    "api-access",
];

fn context(rng: &mut Rng, company: u64) -> Value {
    let (path, title) = PAGES[rng.below(PAGES.len() as u64) as usize];
    let search = if rng.below(3) == 0 {
        "?utm_source=newsletter&utm_medium=email"
    } else {
        ""
    };
    json!({
        "library": {"name": "analytics.js", "version": "next-1.70.0"},
        "page": {
            "path": path,
            "referrer": rng.pick(REFERRERS),
            "search": search,
            "title": title,
            "url": format!("https://app.acme-analytics.io{path}{search}"),
        },
        "userAgent": rng.pick(AGENTS),
        "ip": format!("203.0.{}.{}", rng.below(255), 1 + rng.below(254)),
        "locale": rng.pick(LOCALES),
        "groupId": format!("company_{company:05}"),
    })
}

fn timestamp(rng: &mut Rng) -> String {
    format!(
        "2025-06-02T09:{:02}:{:02}.{:03}Z",
        rng.below(15),
        rng.below(60),
        rng.below(1000)
    )
}

fn track(rng: &mut Rng, id: &str) -> Value {
    let user = rng.below(200_000);
    let company = user / 40;
    let ctx = context(rng, company);
    let (event, properties) = match rng.below(4) {
        0 => {
            let quantity = 1 + rng.below(5);
            let price = (rng.below(20_000) as f64) / 100.0;
            (
                "Order Completed",
                json!({
                    "order_id": format!("ord_{:010}", rng.next() % 10_000_000_000),
                    "total": price * quantity as f64,
                    "currency": "USD",
                    "coupon": if rng.below(2) == 0 { Value::Null } else { json!("SUMMER25") },
                    "products": [{
                        "product_id": format!("sku-{:05}", rng.below(50_000)),
                        "name": "Analytics seat (annual)",
                        "price": price,
                        "quantity": quantity,
                    }],
                }),
            )
        }
        1 => (
            "Feature Used",
            json!({
                "feature": rng.pick(FEATURES),
                "duration_ms": rng.below(90_000),
                "workspace_id": format!("ws_{:06}", rng.below(1_000_000)),
                "source": "web",
            }),
        ),
        2 => (
            "Report Exported",
            json!({
                "report_id": format!("rep_{:08}", rng.below(100_000_000)),
                "format": if rng.below(2) == 0 { "csv" } else { "pdf" },
                "rows": rng.below(250_000),
                "date_range": "last_30_days",
            }),
        ),
        _ => (
            "Seat Added",
            json!({
                "seats": 1 + rng.below(50),
                "plan": rng.pick(PLANS),
                "invited_by": format!("user_{:07}", rng.below(200_000)),
            }),
        ),
    };
    json!({
        "type": "track",
        "event": event,
        "userId": format!("user_{user:07}"),
        "anonymousId": rng.uuid(),
        "messageId": id,
        "timestamp": timestamp(rng),
        "properties": properties,
        "context": ctx,
        "integrations": {},
    })
}

fn identify(rng: &mut Rng, id: &str) -> Value {
    let user = rng.below(200_000);
    let company = user / 40;
    let ctx = context(rng, company);
    json!({
        "type": "identify",
        "userId": format!("user_{user:07}"),
        "anonymousId": rng.uuid(),
        "messageId": id,
        "timestamp": timestamp(rng),
        "traits": {
            "email": format!("person.{user}@example-{company}.com"),
            "name": format!("Person {user}"),
            "plan": rng.pick(PLANS),
            "logins": rng.below(2_000),
            "created_at": "2023-11-14T08:30:00.000Z",
            "company": {"id": format!("company_{company:05}"), "name": format!("Company {company}"), "employees": rng.below(5_000)},
        },
        "context": ctx,
        "integrations": {},
    })
}

fn event(rng: &mut Rng, id: &str) -> Value {
    if rng.below(10) < 7 {
        track(rng, id)
    } else {
        identify(rng, id)
    }
}

/// One pre-serialized `/v1/batch` body with the byte offsets of its messageIds.
struct Template {
    ids: IdStyle,
    items: Vec<Value>,
    body: Vec<u8>,
    id_offsets: Vec<usize>,
}

impl Template {
    fn new(rng: &mut Rng, batch: usize, ids: IdStyle) -> Template {
        let items: Vec<Value> = (0..batch).map(|_| event(rng, ids.placeholder())).collect();
        let body = serde_json::to_vec(&json!({"batch": items, "sentAt": SENT_AT}))
            .expect("serialize batch");
        let needle = ids.placeholder().as_bytes();
        let id_offsets: Vec<usize> = body
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(id_offsets.len(), batch, "one messageId slot per event");
        Template {
            ids,
            items,
            body,
            id_offsets,
        }
    }

    /// The body with fresh messageIds `first..first + batch`.
    fn render(&self, first: u64) -> Vec<u8> {
        let mut body = self.body.clone();
        let len = self.ids.placeholder().len();
        for (i, &at) in self.id_offsets.iter().enumerate() {
            let id = self.ids.message_id(first + i as u64);
            body[at..at + len].copy_from_slice(id.as_bytes());
        }
        body
    }

    fn item_sizes(&self) -> Vec<usize> {
        self.items
            .iter()
            .map(|v| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

struct Daemon {
    child: Child,
    addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_schematic-sync"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("SCHEMATIC_API_KEY")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn schematic-sync serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = addr_tx.send(addr);
                }
                let mut logs = sink.lock().expect("log lock");
                if logs.len() < 10_000 {
                    logs.push(line);
                }
            }
        });
        match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Daemon { child, addr, logs },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let logs = logs.lock().expect("log lock").join("\n");
                panic!("the daemon did not start listening within 30 s; log:\n{logs}");
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits (at most 60 s) for a clean exit.
    fn terminate(&mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return "killed after 60 s without exiting".to_string();
                }
            }
        }
    }

    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `/proc/<pid>/status` field in kB.
fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Bytes a process has passed to read and write calls (`rchar`, `wchar` of
/// `/proc/<pid>/io`).
fn proc_io(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("rchar:"), field("wchar:"))
}

/// CPU ticks (user + system) per thread name of a process.
fn thread_cpu(pid: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // after "pid (comm) ": state is field 3, utime 14, stime 15
        let ticks = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 += ticks,
            None => out.push((name, ticks)),
        }
    }
    out
}

/// Busy and total CPU ticks of the whole machine (all cores), from `/proc/stat`.
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are not busy
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds per thread name spent between two samples.
fn cpu_delta(before: &[(String, u64)], after: &[(String, u64)], hz: f64) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = after
        .iter()
        .map(|(name, t)| {
            let b = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, t)| *t);
            (name.clone(), t.saturating_sub(b) as f64 / hz)
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    /// Events of every 200 answer, warm-up and tail included.
    acked_total: AtomicU64,
    /// Events of 200 answers that arrived inside the measured window.
    acked_window: AtomicU64,
    requests_window: AtomicU64,
    non_200: AtomicU64,
    errors: AtomicU64,
    first_failure: Mutex<Option<String>>,
    latencies_us: Mutex<Vec<u64>>,
}

impl Counters {
    fn failure(&self, what: String) {
        let mut first = self.first_failure.lock().expect("lock");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

struct Window {
    start: Instant,
    end: Instant,
}

/// What every client shares.
#[derive(Clone)]
struct Shared {
    http: reqwest::Client,
    url: String,
    auth: String,
    templates: Arc<Vec<Template>>,
    window: Arc<Window>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

async fn client(index: usize, shared: Shared) {
    let Shared {
        http,
        url,
        auth,
        templates,
        window,
        counters,
        stop,
    } = shared;
    let batch = templates[0].id_offsets.len() as u64;
    let mut next_id: u64 = (index as u64) << 40;
    let mut latencies = Vec::new();
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) && Instant::now() < window.end {
        let template = &templates[(index * TEMPLATES_PER_CLIENT) + round % TEMPLATES_PER_CLIENT];
        round += 1;
        let body = template.render(next_id);
        next_id += batch;
        let sent = Instant::now();
        let answer = http
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        match answer {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.bytes().await.unwrap_or_default();
                let done = Instant::now();
                if status == reqwest::StatusCode::OK {
                    counters.acked_total.fetch_add(batch, Ordering::Relaxed);
                    if done >= window.start && done < window.end {
                        counters.acked_window.fetch_add(batch, Ordering::Relaxed);
                        counters.requests_window.fetch_add(1, Ordering::Relaxed);
                        latencies.push(done.duration_since(sent).as_micros() as u64);
                    }
                } else {
                    counters.non_200.fetch_add(1, Ordering::Relaxed);
                    counters.failure(format!("HTTP {status}: {}", String::from_utf8_lossy(&text)));
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                counters.failure(format!("request error: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    counters
        .latencies_us
        .lock()
        .expect("lock")
        .extend(latencies);
}

struct LoadResult {
    acked_total: u64,
    acked_window: u64,
    requests_window: u64,
    non_200: u64,
    errors: u64,
    first_failure: Option<String>,
    seconds: f64,
    latencies_us: Vec<u64>,
    daemon_cpu: Vec<(String, f64)>,
    client_cpu: f64,
    /// CPU seconds used by the whole machine in the window, and its cores.
    machine_busy: f64,
    cores: f64,
    /// Bytes the daemon read and wrote (file and socket calls) in the window.
    daemon_io: (u64, u64),
}

fn run_load(settings: &Settings, daemon: &Daemon, templates: Arc<Vec<Template>>) -> LoadResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .enable_all()
        .build()
        .expect("client runtime");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(settings.clients)
        .build()
        .expect("http client");
    let url = format!("http://{}/v1/batch", daemon.addr);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let begin = Instant::now();
    let start = begin + Duration::from_secs_f64(settings.warmup);
    let window = Arc::new(Window {
        start,
        end: start + Duration::from_secs_f64(settings.seconds),
    });
    let shared = Shared {
        http,
        url,
        auth,
        templates,
        window: window.clone(),
        counters: counters.clone(),
        stop: stop.clone(),
    };
    let tasks: Vec<_> = (0..settings.clients)
        .map(|i| runtime.spawn(client(i, shared.clone())))
        .collect();
    drop(shared);

    let pid = daemon.pid().to_string();
    let hz = clock_ticks_per_second();
    std::thread::sleep(window.start.saturating_duration_since(Instant::now()));
    let daemon_before = thread_cpu(&pid);
    let client_before = thread_cpu("self");
    let machine_before = machine_cpu();
    let io_before = proc_io(&pid);
    std::thread::sleep(window.end.saturating_duration_since(Instant::now()));
    let daemon_after = thread_cpu(&pid);
    let client_after = thread_cpu("self");
    let machine_after = machine_cpu();
    let io_after = proc_io(&pid);
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let client_cpu = cpu_delta(&client_before, &client_after, hz)
        .iter()
        .map(|(_, s)| s)
        .sum();
    let counters = Arc::try_unwrap(counters).unwrap_or_else(|_| panic!("clients still running"));
    let mut latencies_us = counters.latencies_us.into_inner().expect("lock");
    latencies_us.sort_unstable();
    LoadResult {
        acked_total: counters.acked_total.into_inner(),
        acked_window: counters.acked_window.into_inner(),
        requests_window: counters.requests_window.into_inner(),
        non_200: counters.non_200.into_inner(),
        errors: counters.errors.into_inner(),
        first_failure: counters.first_failure.into_inner().expect("lock"),
        seconds: settings.seconds,
        latencies_us,
        daemon_cpu: cpu_delta(&daemon_before, &daemon_after, hz),
        client_cpu,
        machine_busy: machine_after.0.saturating_sub(machine_before.0) as f64 / hz,
        daemon_io: (
            io_after.0.saturating_sub(io_before.0),
            io_after.1.saturating_sub(io_before.1),
        ),
        cores: machine_after.1.saturating_sub(machine_before.1) as f64 / hz / settings.seconds,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

// ---------------------------------------------------------------------------
// Ceiling
// ---------------------------------------------------------------------------

struct CeilingResult {
    rows: u64,
    seconds: f64,
    prepare_seconds: f64,
}

/// Inserts `rows` rows built from the same templates into a new file through
/// `Store` (same pragmas as the daemon), `per_tx` rows a transaction. Rows are
/// prepared a transaction's worth at a time, outside the timed part.
fn run_ceiling(dir: &Path, templates: &[Template], rows: u64, per_tx: usize) -> CeilingResult {
    let store = Store::new(&StoreConfig {
        path: dir.join("ceiling.db"),
        synchronous: Synchronous::Full,
        ..StoreConfig::default()
    });
    let mut conn = store.open_and_migrate().expect("open the ceiling database");
    // the daemon's ingest writer adds these to Store's pragmas
    schematic_sync::ingest::commit::tune_writer(&conn).expect("tune the ceiling connection");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("read synchronous");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("read journal_mode");
    assert_eq!((sync, mode.as_str()), (2, "wal"), "ceiling pragmas");
    // the daemon's deduplication, with the default retention window
    let (mut dedupe, _) = Dedupe::load(&conn, StoreConfig::default().retention.0, Utc::now())
        .expect("read the ceiling's dedupe keys");

    let items: Vec<&Value> = templates.iter().flat_map(|t| t.items.iter()).collect();
    let envelope = Envelope {
        sent_at: Some(SENT_AT),
        ..Envelope::default()
    };
    let mut timed = Duration::ZERO;
    let mut preparing = Duration::ZERO;
    let mut done: u64 = 0;
    let mut chunk: Vec<EventRow> = Vec::with_capacity(per_tx);
    while done < rows {
        let t0 = Instant::now();
        chunk.clear();
        let n = (rows - done).min(per_tx as u64);
        let received_at = Utc::now();
        for k in 0..n {
            let i = done + k;
            let mut value = items[(i % items.len() as u64) as usize].clone();
            let id = templates[0].ids.message_id(CEILING_ID_BASE + i);
            value["messageId"] = Value::String(id);
            let message =
                segment::prepare(value, None, &envelope, received_at).expect("valid event");
            chunk.push(EventRow::new(&message, WRITE_KEY));
        }
        preparing += t0.elapsed();

        let t1 = Instant::now();
        let outcome = events::insert_committed(&mut conn, &mut dedupe, &chunk).expect("insert");
        timed += t1.elapsed();
        assert_eq!(outcome.stored as u64, n, "ceiling rows are unique");
        done += n;
    }
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count ceiling rows");
    assert_eq!(stored as u64, rows);
    CeilingResult {
        rows,
        seconds: timed.as_secs_f64(),
        prepare_seconds: preparing.as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------

fn write_config(dir: &Path, db: &Path, body_bytes: usize, settings: &Settings) -> PathBuf {
    let request_limit = (body_bytes * 2).max(512 * 1024);
    let delivery = settings
        .delivery_schedule
        .as_deref()
        .map(|s| format!("[delivery]\nschedule = {s:?}\n\n"))
        .unwrap_or_default();
    // No API key reaches the daemon (SCHEMATIC_API_KEY is removed from its
    // environment), so it maps events but sends nothing; the capture URL
    // points at a closed local port all the same.
    let config = format!(
        "[store]\npath = {db:?}\nsynchronous = \"full\"\n\n\
         [server]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [{WRITE_KEY:?}]\n\
         max_request_size = \"{request_limit}B\"\nmax_batch_messages = {batches}\n\
         shutdown_timeout = \"30s\"\n\n\
         [schematic]\ncapture_url = \"http://127.0.0.1:9\"\n\n\
         {delivery}[log]\nlevel = \"info\"\n",
        db = db.display().to_string(),
        batches = settings.batch.max(2500),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let settings = Settings::from_env();
    let dir = tempfile::Builder::new()
        .prefix("schematic-sync-bench-")
        .tempdir()
        .expect("temp dir");
    let db = dir.path().join("bench.db");

    let mut rng = Rng(0x5eed_1234);
    let templates: Vec<Template> = (0..settings.clients * TEMPLATES_PER_CLIENT)
        .map(|_| Template::new(&mut rng, settings.batch, settings.ids))
        .collect();
    let sizes: Vec<usize> = templates.iter().flat_map(Template::item_sizes).collect();
    let avg_size = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    let body_bytes = templates.iter().map(|t| t.body.len()).max().unwrap_or(0);
    let templates = Arc::new(templates);
    let config = write_config(dir.path(), &db, body_bytes, &settings);

    println!("schematic-sync ingest benchmark");
    println!(
        "  {} clients x /v1/batch of {} events, {:.1} s warm-up + {:.1} s measured, synchronous FULL, {} client thread(s)",
        settings.clients, settings.batch, settings.warmup, settings.seconds, settings.client_threads
    );
    println!(
        "  daemon delivery.schedule: {} (no API key: the mapper runs, nothing is sent)",
        settings
            .delivery_schedule
            .as_deref()
            .unwrap_or("default, every 5 s")
    );
    println!(
        "  events: 70% track / 30% identify, {:.0} bytes on average ({}..{}), messageIds: {}; request bodies ~{} KiB",
        avg_size,
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        settings.ids.name(),
        body_bytes / 1024
    );

    let mut daemon = Daemon::start(&config);
    let pid = daemon.pid().to_string();
    let load = run_load(&settings, &daemon, templates.clone());
    let peak_rss_kb = proc_status_kb(&pid, "VmHWM:").unwrap_or(0);
    let exit = daemon.terminate();
    let warnings = daemon.log_lines("WARN");
    let errors = daemon.log_lines("ERROR");

    let conn = rusqlite::Connection::open(&db).expect("open the daemon's database");
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count events");
    drop(conn);
    let db_mb = schematic_sync::store::disk_size(&db) as f64 / 1e6;

    let ceiling = run_ceiling(
        dir.path(),
        &templates,
        (stored.max(0) as u64).max(10_000),
        settings.ceiling_tx,
    );

    let events_per_sec = load.acked_window as f64 / load.seconds;
    let ceiling_per_sec = ceiling.rows as f64 / ceiling.seconds;
    let ratio = events_per_sec / ceiling_per_sec;
    let rss_mb = peak_rss_kb as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let ok_rate = events_per_sec >= TARGET_EVENTS_PER_SEC;
    let ok_ratio = ratio >= TARGET_RATIO;
    let ok_rss = peak_rss_kb > 0 && rss_mb < TARGET_RSS_MB;
    let ok_count = stored as u64 == load.acked_total;

    println!();
    println!("daemon (HTTP, {} concurrent clients)", settings.clients);
    println!("  measured window          {:.1} s", load.seconds);
    println!(
        "  events acknowledged      {} in the window ({} requests); {} in the whole run",
        load.acked_window, load.requests_window, load.acked_total
    );
    println!("  acknowledged events/s    {events_per_sec:.0}");
    println!(
        "  request latency          p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&load.latencies_us, 0.50),
        percentile(&load.latencies_us, 0.99),
        percentile(&load.latencies_us, 1.0)
    );
    println!(
        "  non-200 answers          {} (transport errors {}){}",
        load.non_200,
        load.errors,
        load.first_failure
            .as_deref()
            .map(|f| format!("; first: {f}"))
            .unwrap_or_default()
    );
    println!("  peak RSS (VmHWM)         {rss_mb:.1} MB");
    let daemon_cpu_total: f64 = load.daemon_cpu.iter().map(|(_, s)| s).sum();
    let per_thread: Vec<String> = load
        .daemon_cpu
        .iter()
        .map(|(n, s)| format!("{n} {:.0}%", 100.0 * s / load.seconds))
        .collect();
    println!(
        "  daemon CPU in window     {:.0}% of one core ({})",
        100.0 * daemon_cpu_total / load.seconds,
        per_thread.join(", ")
    );
    println!(
        "  bench client CPU         {:.0}% of one core",
        100.0 * load.client_cpu / load.seconds
    );
    let per_event = |bytes: u64| bytes as f64 / load.acked_window.max(1) as f64 / 1024.0;
    println!(
        "  daemon I/O in window     read {:.0} MB, written {:.0} MB ({:.1} KiB read, {:.1} KiB written per event, HTTP included)",
        load.daemon_io.0 as f64 / 1e6,
        load.daemon_io.1 as f64 / 1e6,
        per_event(load.daemon_io.0),
        per_event(load.daemon_io.1)
    );
    let others = (load.machine_busy - daemon_cpu_total - load.client_cpu).max(0.0);
    println!(
        "  machine CPU in window    {:.0}% of {:.0} cores busy; other processes {:.0}% of one core",
        100.0 * load.machine_busy / (load.seconds * load.cores.max(1.0)),
        load.cores,
        100.0 * others / load.seconds
    );
    println!(
        "  rows in events table     {stored} (acknowledged in the run: {}) {}",
        load.acked_total,
        if ok_count { "MATCH" } else { "MISMATCH" }
    );
    println!("  database size            {db_mb:.1} MB; daemon exit: {exit}");
    if !warnings.is_empty() || !errors.is_empty() {
        println!(
            "  daemon log               {} WARN, {} ERROR lines; the first five:",
            warnings.len(),
            errors.len(),
        );
        for line in errors.iter().chain(&warnings).take(5) {
            println!("    {line}");
        }
    }
    println!();
    println!(
        "ceiling (direct SQLite: Store pragmas + the ingest writer's, {} rows a transaction)",
        settings.ceiling_tx
    );
    println!(
        "  rows inserted            {} in {:.2} s (preparing them, untimed: {:.2} s)",
        ceiling.rows, ceiling.seconds, ceiling.prepare_seconds
    );
    println!("  ceiling rows/s           {ceiling_per_sec:.0}");
    println!();
    println!("summary");
    println!(
        "  clients {} | seconds {:.1} | acknowledged {} | events/s {:.0} | peak RSS {:.1} MB | ceiling rows/s {:.0} | ratio {:.3}",
        settings.clients,
        load.seconds,
        load.acked_window,
        events_per_sec,
        rss_mb,
        ceiling_per_sec,
        ratio
    );
    println!(
        "  {} events/s >= {TARGET_EVENTS_PER_SEC:.0}",
        verdict(ok_rate)
    );
    println!("  {} ratio >= {TARGET_RATIO}", verdict(ok_ratio));
    println!("  {} peak RSS < {TARGET_RSS_MB:.0} MB", verdict(ok_rss));
    println!(
        "  {} events table rows == acknowledged events",
        verdict(ok_count)
    );
    println!(
        "  overall: {}",
        verdict(ok_rate && ok_ratio && ok_rss && ok_count)
    );
}
