//! Operator commands that read or change the queue: `status`, `drain`,
//! `failed`, `replay` and `preview`. Each prints for people by default and
//! JSON with `--json`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::config::{Config, HumanDuration};
use crate::delivery::mapper::event_idempotency_key;
use crate::delivery::worker::{Worker, NOT_BEFORE, PAUSED};
use crate::segment::{self, Envelope};
use crate::store::deliveries::{self, ReplayFilter};
use crate::store::events::{self, hash_write_key};
use crate::store::Store;

/// An RFC 3339 time, or a duration ago (`2h` = two hours ago).
pub fn parse_time_arg(s: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Some(t) = segment::parse_time(s) {
        return Ok(t);
    }
    let ago: HumanDuration = s.parse().map_err(|_| {
        anyhow::anyhow!("{s:?} is neither an RFC 3339 time nor a duration such as 2h")
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(ago.0).unwrap_or_default())
}

pub fn status(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    let conn = store.open_and_migrate()?;
    let now = Utc::now();
    let states = deliveries::count_by_state(&conn)?;
    let events = events::count_by_status(&conn)?;
    let paused = deliveries::worker_state(&conn, PAUSED)?;
    let not_before = deliveries::worker_state(&conn, NOT_BEFORE)?
        .filter(|t| segment::parse_time(t).is_some_and(|t| t > now));
    let oldest_due = deliveries::oldest_due(&conn, now)?;
    let next_due = deliveries::next_due(&conn)?;
    let runs = crate::store::audiences::recent_runs(&conn, 5)?;
    if as_json {
        let states: Map<String, Value> = states
            .iter()
            .map(|(s, n)| (s.to_string(), json!(n)))
            .collect();
        let events: Map<String, Value> =
            events.iter().map(|(s, n)| (s.clone(), json!(n))).collect();
        let out = json!({
            "store": store.path.display().to_string(),
            "states": states,
            "paused": paused.is_some(),
            "paused_reason": paused,
            "oldest_due": oldest_due,
            "next_due": next_due,
            "not_before": not_before,
            "events": events,
            "sync_runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let paint = Paint::for_stdout();
    println!("store:       {}", store.path.display());
    match &paused {
        Some(reason) => println!("sending:     {}", paint.red(&format!("PAUSED: {reason}"))),
        None => println!("sending:     {}", paint.green("active")),
    }
    if let Some(t) = &not_before {
        println!("waiting:     Schematic asked for no request before {t}");
    }
    match &oldest_due {
        Some(t) => println!("oldest due:  {t} ({} ago)", age(now, t)),
        None => println!("oldest due:  none"),
    }
    if let Some(t) = next_due.filter(|_| oldest_due.is_none()) {
        println!("next due:    {t}");
    }
    println!("deliveries:");
    for (state, n) in &states {
        let count = n.to_string();
        let count = if *state == "failed" && *n > 0 {
            paint.red(&count)
        } else {
            count
        };
        println!("  {state:<11} {count}");
    }
    println!("events:");
    if events.is_empty() {
        println!("  (none)");
    }
    for (status, n) in &events {
        println!("  {status:<11} {n}");
    }
    if !runs.is_empty() {
        println!("last audience syncs:");
        for r in &runs {
            let outcome = match &r.error {
                Some(e) => format!("ERROR: {e}"),
                None if r.finished_at.is_none() => "interrupted or running".to_string(),
                None => format!("+{} -{} enqueued {}", r.added, r.removed, r.enqueued),
            };
            println!(
                "  #{:<5} {:<28} {}  {outcome}",
                r.id, r.audience, r.started_at
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// ANSI colour, only on a terminal and unless `NO_COLOR` is set.
struct Paint(bool);

impl Paint {
    fn for_stdout() -> Paint {
        use std::io::IsTerminal;
        Paint(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }
    fn wrap(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn red(&self, text: &str) -> String {
        self.wrap("31;1", text)
    }
    fn green(&self, text: &str) -> String {
        self.wrap("32", text)
    }
}

fn age(now: DateTime<Utc>, t: &str) -> String {
    let Some(t) = segment::parse_time(t) else {
        return "?".into();
    };
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// `drain`: one pass, then exit. 0: nothing failed; 1: some deliveries
/// failed; 3: sending is paused (no key, or the key is refused).
pub fn drain(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    store.open_and_migrate()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        let worker = Worker::new(&store, config)?;
        let (_keep, stop) = tokio::sync::watch::channel(false);
        worker.drain(&stop).await
    })?;
    if as_json {
        println!(
            "{}",
            json!({
                "mapped": report.mapped.events,
                "skipped": report.mapped.skipped,
                "requests": report.requests,
                "delivered": report.delivered,
                "retried": report.retried,
                "failed": report.failed,
                "paused": report.paused,
                "throttled_until": report.throttled_until.map(crate::store::time_text),
            })
        );
    } else {
        println!(
            "mapped {} events ({} skipped), {} requests: {} delivered, {} to retry, {} failed",
            report.mapped.events,
            report.mapped.skipped,
            report.requests,
            report.delivered,
            report.retried,
            report.failed
        );
        if let Some(reason) = &report.paused {
            println!("sending is paused: {reason}");
        }
        if let Some(t) = report.throttled_until {
            println!(
                "Schematic asked to wait until {}",
                crate::store::time_text(t)
            );
        }
    }
    Ok(if report.paused.is_some() {
        ExitCode::from(3)
    } else if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn failed(config: &Config, limit: usize, as_json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    let conn = store.open_and_migrate()?;
    let rows = deliveries::failed(&conn, limit)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no failed deliveries");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<8}  {:>6}  {:>8}  {:<24}  error",
        "id", "kind", "status", "attempts", "source"
    );
    for r in &rows {
        let source = match (&r.message_id, &r.audience_key) {
            (Some(m), _) => format!("message {m}"),
            (None, Some(a)) => format!("audience {a}/{}", r.user_id.as_deref().unwrap_or("?")),
            _ => "-".into(),
        };
        let status = r.last_status.map_or("-".to_string(), |s| s.to_string());
        let error = r.last_error.as_deref().unwrap_or("-");
        let response = r
            .last_response
            .as_deref()
            .map(|t| format!(" — {}", one_line(t, 120)))
            .unwrap_or_default();
        println!(
            "{:>8}  {:<8}  {:>6}  {:>8}  {:<24}  {error}{response}",
            r.id,
            r.kind,
            status,
            r.attempts,
            one_line(&source, 24)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        flat.chars().take(max.saturating_sub(1)).collect::<String>() + "…"
    } else {
        flat
    }
}

pub fn replay(
    config: &Config,
    filter: &ReplayFilter,
    remap: bool,
    dry_run: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    if filter.ids.is_empty()
        && !filter.all
        && filter.since.is_none()
        && filter.until.is_none()
        && filter.status.is_none()
    {
        anyhow::bail!("say which failed deliveries to replay: --id ID, --all, --since/--until T or --status CODE");
    }
    let store = Store::new(&config.store);
    let mut conn = store.open_and_migrate()?;
    let mappings = config.compiled_mappings()?;
    let candidates = deliveries::replay_candidates(&conn, filter)?;
    if dry_run {
        let ids: Vec<i64> = candidates.iter().map(|c| c.id).collect();
        if as_json {
            println!("{}", json!({"would_replay": ids.len(), "ids": ids}));
        } else {
            let sample: Vec<String> = ids.iter().take(10).map(|i| i.to_string()).collect();
            println!(
                "would replay {} failed deliveries{}",
                ids.len(),
                if sample.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (ids {}{})",
                        sample.join(", "),
                        if ids.len() > 10 { ", …" } else { "" }
                    )
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let progress = crate::cli::progress_bar(candidates.len() as u64);
    let now = Utc::now();
    let (mut replayed, mut superseded, mut skipped) = (0usize, 0usize, Vec::new());
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for c in &candidates {
        progress.inc(1);
        if deliveries::supersede_if_stale(&tx, c.id)? {
            superseded += 1;
            continue;
        }
        let mut payload = None;
        if remap {
            match remapped_payload(&mappings, c.mapping.as_deref(), c.event_raw.as_deref()) {
                Ok(Some(p)) => payload = Some(p),
                Ok(None) => {}
                Err(reason) => {
                    skipped.push((c.id, reason));
                    continue;
                }
            }
        }
        if deliveries::requeue(&tx, c.id, payload.as_deref(), now)? {
            replayed += 1;
        } else {
            skipped.push((c.id, "its mapping failed and it has no payload: replay it with --remap after fixing the mapping".into()));
        }
    }
    tx.commit()?;
    progress.finish_and_clear();
    if as_json {
        let skipped: Vec<Value> = skipped
            .iter()
            .map(|(id, why)| json!({"id": id, "reason": why}))
            .collect();
        println!(
            "{}",
            json!({"replayed": replayed, "superseded": superseded, "skipped": skipped})
        );
    } else {
        println!(
            "replayed {replayed} failed deliveries; they are pending and go out on the next drain"
        );
        if superseded > 0 {
            println!("{superseded} audience deliveries superseded by a newer value instead");
        }
        for (id, why) in &skipped {
            println!("skipped {id}: {why}");
        }
    }
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The payload an event delivery gets with today's mappings (`--remap`).
/// `Ok(None)`: not an event delivery, keep the stored payload.
fn remapped_payload(
    mappings: &[crate::mapping::Mapping],
    mapping: Option<&str>,
    event_raw: Option<&str>,
) -> Result<Option<String>, String> {
    let Some(name) = mapping else {
        return Ok(None);
    };
    let Some(raw) = event_raw else {
        return Err("its event is no longer stored, so it cannot be remapped".into());
    };
    let mapping = mappings
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| format!("mapping {name:?} is no longer configured"))?;
    let msg: Value =
        serde_json::from_str(raw).map_err(|e| format!("stored event is not JSON: {e}"))?;
    let event = mapping
        .apply(&msg)
        .map_err(|e| format!("remap failed: {e}"))?;
    serde_json::to_string(&event)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// `preview`: what a message becomes, without storing anything.
pub fn preview(config: &Config, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut text = String::new();
    match file {
        None => {
            std::io::stdin().read_to_string(&mut text)?;
        }
        Some(p) if p == Path::new("-") => {
            std::io::stdin().read_to_string(&mut text)?;
        }
        Some(p) => {
            text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
        }
    }
    let messages: Vec<Result<Value, String>> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => items.into_iter().map(Ok).collect(),
        Ok(v) => vec![Ok(v)],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not valid JSON: {e}")))
            .collect(),
    };
    let mappings = config.compiled_mappings()?;
    let mut ok = true;
    for (i, message) in messages.into_iter().enumerate() {
        let out = match message
            .and_then(|v| segment::prepare(v, None, &Envelope::default(), Utc::now()))
        {
            Err(e) => {
                ok = false;
                json!({"input": i, "error": e})
            }
            Ok(p) if p.membership.is_some() => {
                let m = p.membership.as_ref().map(|m| json!({"audience": m.audience_key, "user_id": m.user_id, "member": m.member}));
                json!({"input": i, "messageId": p.message_id, "audience_membership": m,
                       "note": "audience changes are sent by the next audience sync, not mapped"})
            }
            Ok(p) => {
                let mapped = crate::mapping::map_message(&mappings, &p.raw);
                let skipped = mapped.is_empty();
                let key_hash = hash_write_key("");
                let deliveries: Vec<Value> = mapped
                    .into_iter()
                    .map(|m| match m.result {
                        Ok(event) => {
                            let mut v = serde_json::to_value(&event).unwrap_or(Value::Null);
                            if let Value::Object(obj) = &mut v {
                                obj.insert(
                                    "idempotency_key".into(),
                                    json!(event_idempotency_key(
                                        &key_hash,
                                        &p.message_id,
                                        &m.mapping
                                    )),
                                );
                            }
                            json!({"mapping": m.mapping, "event": v})
                        }
                        Err(e) => json!({"mapping": m.mapping, "error": e}),
                    })
                    .collect();
                json!({"input": i, "messageId": p.message_id, "skipped": skipped, "deliveries": deliveries})
            }
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Maps received events (applying Engage membership messages) and syncs the
/// given audience, or every audience. Shared by `audiences sync` and the
/// scheduler in `serve`.
pub fn sync_audiences(
    conn: &mut rusqlite::Connection,
    config: &Config,
    key: Option<&str>,
    dry_run: bool,
    full: bool,
) -> anyhow::Result<Vec<crate::audience::SyncOutcome>> {
    // Engage messages already acknowledged are filed first (as the daemon
    // does every drain tick), so the diff, dry or not, sees them.
    let mappings = config.compiled_mappings()?;
    crate::delivery::mapper::map_received(conn, &mappings, Utc::now(), None, &|| false)?;
    let keys = match key {
        Some(k) => {
            if crate::store::audiences::trait_name_of(conn, k)?.is_none() {
                anyhow::bail!("unknown audience {k:?}: see `schematic-sync audiences list`");
            }
            vec![k.to_string()]
        }
        None => crate::store::audiences::audience_keys(conn)?,
    };
    let mut outcomes = Vec::with_capacity(keys.len());
    for k in keys {
        let outcome = if dry_run {
            crate::audience::dry_run(conn, &k, full)?
        } else {
            crate::audience::sync(conn, &k, &config.audiences.user_key, full)?
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

pub fn audiences_sync(
    config: &Config,
    key: Option<&str>,
    dry_run: bool,
    full: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    let mut conn = store.open_and_migrate()?;
    let outcomes = sync_audiences(&mut conn, config, key, dry_run, full)?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"dry_run": dry_run, "full": full, "audiences": outcomes})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if outcomes.is_empty() {
        println!(
            "no audiences yet: they appear with the first Engage message or `audiences import`"
        );
    }
    for o in &outcomes {
        let sample = |users: &[String]| {
            if users.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", users.join(", "))
            }
        };
        if dry_run {
            println!(
                "{}: would add {}{}, would remove {}{}",
                o.audience,
                o.added,
                sample(&o.sample_added),
                o.removed,
                sample(&o.sample_removed)
            );
        } else {
            println!(
                "{}: added {}, removed {}, enqueued {} (sync run {})",
                o.audience,
                o.added,
                o.removed,
                o.enqueued,
                o.run_id.unwrap_or_default()
            );
        }
    }
    if dry_run {
        println!("dry run: nothing was changed or enqueued");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audiences_list(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    let conn = store.open_and_migrate()?;
    let list = crate::store::audiences::list(&conn)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no audiences yet");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<32} {:>10} {:>9} {:>9}  last sync",
        "audience", "trait", "members", "to add", "to remove"
    );
    for a in &list {
        println!(
            "{:<32} {:<32} {:>10} {:>9} {:>9}  {}",
            a.key,
            a.trait_name,
            a.members,
            a.pending_additions,
            a.pending_removals,
            a.last_synced_at.as_deref().unwrap_or("never")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Users per temp-table transaction while reading a snapshot.
const SNAPSHOT_CHUNK: usize = 10_000;

pub fn audiences_import(
    config: &Config,
    key: &str,
    file: &Path,
    allow_empty: bool,
) -> anyhow::Result<ExitCode> {
    if key.trim().is_empty() {
        anyhow::bail!("the audience key must not be empty");
    }
    let store = Store::new(&config.store);
    let mut conn = store.open_and_migrate()?;
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = crate::cli::progress_bar(total);
    crate::store::audiences::begin_snapshot(&conn)?;
    let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK);
    let flush = |conn: &mut rusqlite::Connection, chunk: &mut Vec<String>| -> anyhow::Result<()> {
        let tx = conn.transaction()?;
        crate::store::audiences::add_to_snapshot(&tx, chunk)?;
        tx.commit()?;
        chunk.clear();
        Ok(())
    };
    for (n, line) in std::io::BufRead::lines(std::io::BufReader::new(f)).enumerate() {
        let line =
            line.with_context(|| format!("{}: cannot read line {}", file.display(), n + 1))?;
        progress.inc(line.len() as u64 + 1);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let user = snapshot_user(line).map_err(|e| {
            anyhow::anyhow!("{}:{}: {e}; nothing was imported", file.display(), n + 1)
        })?;
        chunk.push(user);
        if chunk.len() >= SNAPSHOT_CHUNK {
            flush(&mut conn, &mut chunk)?;
        }
    }
    flush(&mut conn, &mut chunk)?;
    progress.finish_and_clear();
    let size = crate::store::audiences::snapshot_size(&conn)?;
    if size == 0 && !allow_empty {
        anyhow::bail!(
            "{} has no users: an empty export usually means a broken export, so nothing was changed; \
             pass --allow-empty to make every member of {key:?} a non-member",
            file.display()
        );
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (joined, left) = crate::store::audiences::apply_snapshot(&tx, key, Utc::now())?;
    tx.commit()?;
    println!(
        "imported {size} users into {key}: {joined} became members, {left} are no longer members"
    );
    println!("the next audience sync sends the changes (`schematic-sync audiences sync {key} --dry-run` shows them)");
    Ok(ExitCode::SUCCESS)
}

/// A snapshot line: a plain user id, or an NDJSON object with `userId`.
fn snapshot_user(line: &str) -> Result<String, String> {
    if !line.starts_with('{') {
        return Ok(line.to_string());
    }
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match v.get("userId").or_else(|| v.get("user_id")) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err("the object has no userId".into()),
    }
}

/// `config check`: the config loaded (or the error already printed), then
/// the effective settings and mappings.
pub fn config_check(config: &Config, path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mappings = config.compiled_mappings()?;
    let source = path.map_or_else(
        || {
            if Path::new("config.toml").exists() {
                "config.toml".to_string()
            } else {
                "built-in defaults".to_string()
            }
        },
        |p| p.display().to_string(),
    );
    println!("{source}: ok");
    println!("store.path            {}", config.store.path.display());
    println!("server.listen         {}", config.server.listen);
    println!("schematic.capture_url {}", config.schematic.capture_url);
    let key = if config.schematic.resolve_api_key().is_some() {
        "set"
    } else {
        "MISSING (sending stays paused)"
    };
    println!(
        "schematic API key     {key} (from {} or schematic.api_key)",
        config.schematic.api_key_env
    );
    println!("delivery.schedule     {}", config.delivery.schedule.source);
    println!("audiences.schedule    {}", config.audiences.schedule.source);
    let origin = if config.mappings.is_some() {
        "[[mappings]]"
    } else {
        "presets"
    };
    println!("mappings ({origin}):");
    for m in &mappings {
        println!(
            "  {:?}: {} when {}{}",
            m.name,
            m.action.as_str(),
            m.trigger.source(),
            if m.enabled { "" } else { " (disabled)" }
        );
        for (field, value) in &m.fields {
            println!("      {field} = {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
