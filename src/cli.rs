//! The command line (SPEC 7). Each command is a small function that loads the
//! config, opens the store and calls into the library.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::config::Config;
use crate::segment::{self, Envelope};
use crate::store::dedupe::Dedupe;
use crate::store::events::{self, EventRow};
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "schematic-sync",
    version,
    about = "Segment events and Engage audiences to Schematic, durably, from one SQLite file"
)]
pub struct Cli {
    /// Config file [default: ./config.toml; built-in defaults when it does not exist]
    #[arg(long, global = true, env = "SCHEMATIC_SYNC_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: HTTP ingest API, scheduler and delivery worker
    Serve,
    /// Apply pending database migrations and exit (they also run at start)
    Migrate,
    /// Load NDJSON Segment messages from a file (backfill); `-` reads stdin
    Ingest {
        file: PathBuf,
        /// Write key the messages are recorded under (scopes messageId dedupe)
        #[arg(long)]
        write_key: Option<String>,
    },
    /// Counts per state, oldest due delivery, paused or not
    Status {
        #[arg(long)]
        json: bool,
    },
    /// One drain pass now (all due deliveries), then exit; exit code 0 if nothing failed
    Drain {
        #[arg(long)]
        json: bool,
    },
    /// Failed deliveries with status, error and attempts
    Failed {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move failed deliveries back to pending (attempts and retry window reset)
    Replay {
        /// Delivery ids to replay
        #[arg(long = "id", num_args = 1..)]
        ids: Vec<i64>,
        /// Every failed delivery
        #[arg(long)]
        all: bool,
        /// Failed at or after this time (RFC 3339, or a duration ago such as 2h)
        #[arg(long)]
        since: Option<String>,
        /// Failed before this time (RFC 3339, or a duration ago)
        #[arg(long)]
        until: Option<String>,
        /// Only deliveries whose last HTTP status was this
        #[arg(long)]
        status: Option<u16>,
        /// Rebuild payloads from the stored events with today's mappings
        #[arg(long)]
        remap: bool,
        /// Show what would be replayed, change nothing
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete failed deliveries older than a time (they are otherwise kept for replay)
    Purge {
        /// Purge failed deliveries (the only kind purge removes; the rest goes by retention)
        #[arg(long, required = true)]
        failed: bool,
        /// Older than this: RFC 3339, or a duration ago such as 30d
        #[arg(long)]
        before: String,
    },
    /// Configuration: `config check` validates the file and prints the effective mappings
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Audience operations: list, sync, import
    Audiences {
        #[command(subcommand)]
        command: AudiencesCommand,
    },
    /// Print the Schematic events a Segment message (JSON or NDJSON) would become; stores nothing
    Preview {
        /// File with one message or NDJSON; `-` or nothing reads stdin
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config file and print the effective settings and mappings
    Check,
}

#[derive(Debug, Subcommand)]
pub enum AudiencesCommand {
    /// Each audience with its member count, pending changes and last sync
    List {
        #[arg(long)]
        json: bool,
    },
    /// Enqueue an identify for every (audience, user) whose state changed since the last sync
    Sync {
        /// Only this audience (default: all)
        key: Option<String>,
        /// Print the counts of additions and removals, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Resend the whole current state, not only the changes
        #[arg(long)]
        full: bool,
        #[arg(long)]
        json: bool,
    },
    /// Replace the desired membership of KEY with the users in FILE (one id a line, or NDJSON {"userId": ...})
    Import {
        key: String,
        file: PathBuf,
        /// Accept an empty FILE (every member becomes a non-member)
        #[arg(long)]
        allow_empty: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Loads the config: an explicit path must exist; the default `config.toml`
/// falls back to built-in defaults when absent.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => {
            let default = Path::new("config.toml");
            if default.exists() {
                Config::load(default)
            } else {
                Ok(Config::default())
            }
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            crate::logging::init(&config.log, None);
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(crate::server::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            crate::logging::init(&config.log, Some("warn"));
            let store = Store::new(&config.store);
            let mut conn = store.connect()?;
            let applied = crate::store::migrate::apply(&mut conn)?;
            if applied.is_empty() {
                println!("{}: schema is up to date", store.path.display());
            } else {
                for name in applied {
                    println!("applied {name}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest { file, write_key } => {
            crate::logging::init(&config.log, Some("warn"));
            ingest_file(&config, &file, write_key.as_deref().unwrap_or_default())
        }
        Command::Status { json } => {
            crate::logging::init(&config.log, Some("warn"));
            crate::operations::status(&config, json)
        }
        Command::Drain { json } => {
            crate::logging::init(&config.log, Some("warn"));
            crate::operations::drain(&config, json)
        }
        Command::Failed { limit, json } => {
            crate::logging::init(&config.log, Some("warn"));
            crate::operations::failed(&config, limit, json)
        }
        Command::Replay {
            ids,
            all,
            since,
            until,
            status,
            remap,
            dry_run,
            json,
        } => {
            crate::logging::init(&config.log, Some("warn"));
            let filter = crate::store::deliveries::ReplayFilter {
                ids,
                all,
                since: since
                    .as_deref()
                    .map(crate::operations::parse_time_arg)
                    .transpose()?,
                until: until
                    .as_deref()
                    .map(crate::operations::parse_time_arg)
                    .transpose()?,
                status,
            };
            crate::operations::replay(&config, &filter, remap, dry_run, json)
        }
        Command::Audiences { command } => {
            crate::logging::init(&config.log, Some("warn"));
            match command {
                AudiencesCommand::List { json } => crate::operations::audiences_list(&config, json),
                AudiencesCommand::Sync {
                    key,
                    dry_run,
                    full,
                    json,
                } => {
                    crate::operations::audiences_sync(&config, key.as_deref(), dry_run, full, json)
                }
                AudiencesCommand::Import {
                    key,
                    file,
                    allow_empty,
                } => crate::operations::audiences_import(&config, &key, &file, allow_empty),
            }
        }
        Command::Purge { failed: _, before } => {
            crate::logging::init(&config.log, Some("warn"));
            let before = crate::operations::parse_time_arg(&before)?;
            let store = Store::new(&config.store);
            let mut conn = store.open_and_migrate()?;
            let n = crate::store::retention::purge_failed(&mut conn, before)?;
            println!(
                "purged {n} failed deliveries last tried before {}",
                crate::store::time_text(before)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => crate::operations::config_check(&config, cli.config.as_deref()),
        Command::Preview { file } => {
            crate::logging::init(&config.log, Some("warn"));
            crate::operations::preview(&config, file.as_deref())
        }
    }
}

/// Rows per transaction for the NDJSON backfill.
const INGEST_CHUNK: usize = 1000;

fn ingest_file(config: &Config, file: &Path, write_key: &str) -> anyhow::Result<ExitCode> {
    let store = Store::new(&config.store);
    let mut conn = store.open_and_migrate()?;
    let (reader, total): (Box<dyn BufRead>, u64) = if file == Path::new("-") {
        (Box::new(std::io::stdin().lock()), 0)
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        (Box::new(std::io::BufReader::new(f)), len)
    };
    let progress = progress_bar(total);
    let limit = config.server.max_message_size.0 as usize;
    let (mut stored, mut duplicates, mut invalid) = (0usize, 0usize, 0usize);
    let mut chunk = Vec::with_capacity(INGEST_CHUNK);
    let (mut dedupe, _) = Dedupe::load(&conn, config.store.retention.0, chrono::Utc::now())?;
    let mut flush =
        |chunk: &mut Vec<EventRow>, conn: &mut rusqlite::Connection| -> anyhow::Result<()> {
            let outcome = events::insert_committed(conn, &mut dedupe, chunk)?;
            stored += outcome.stored;
            duplicates += outcome.duplicates;
            chunk.clear();
            Ok(())
        };
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line =
            line.with_context(|| format!("{}: cannot read line {line_no}", file.display()))?;
        progress.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        let problem = if line.len() > limit {
            Err(format!(
                "{} bytes, over the {limit}-byte limit (server.max_message_size)",
                line.len()
            ))
        } else {
            serde_json::from_str::<Value>(&line)
                .map_err(|e| format!("not valid JSON: {e}"))
                .and_then(|mut v| {
                    if let Some(m) = v.as_object_mut() {
                        m.remove("writeKey");
                    }
                    segment::prepare(v, None, &Envelope::default(), chrono::Utc::now())
                })
        };
        match problem {
            Ok(message) => chunk.push(EventRow::new(&message, write_key)),
            Err(e) => {
                invalid += 1;
                progress.suspend(|| eprintln!("{}:{line_no}: skipped: {e}", file.display()));
            }
        }
        if chunk.len() >= INGEST_CHUNK {
            flush(&mut chunk, &mut conn)?;
        }
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut conn)?;
    }
    progress.finish_and_clear();
    println!("ingested {stored}, duplicates {duplicates}, invalid {invalid}");
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A progress bar on a terminal; hidden otherwise.
pub fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = if total > 0 {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta})",
    ) {
        bar.set_style(style);
    }
    bar
}
