//! Shared test support: a temporary store and config, the daemon as a real
//! subprocess, the CLI runner, and (in `mock_schematic.rs`) the mock
//! Schematic capture API. Every integration test uses these.
#![allow(dead_code)]

pub mod mock_schematic;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The binary under test, built by cargo for integration tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_schematic-sync"))
}

/// A temporary folder with a config file and a database path.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub db_path: PathBuf,
}

impl TestEnv {
    /// `extra` is appended to a base config that listens on a free loopback
    /// port and keeps the database in the temp folder. Sections named in
    /// `extra` must not repeat `[store]` or `[server]`; use `with_sections`.
    pub fn new(extra: &str) -> TestEnv {
        Self::with_sections("", "", extra)
    }

    /// `store` and `server` are extra lines for those sections.
    pub fn with_sections(store: &str, server: &str, extra: &str) -> TestEnv {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = dir.path().join("test.db");
        let config_path = dir.path().join("config.toml");
        let text = format!(
            "[store]\npath = {db:?}\n{store}\n\n[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"5s\"\n{server}\n\n{extra}\n",
            db = db_path.display().to_string(),
        );
        std::fs::write(&config_path, text).expect("write config");
        TestEnv {
            dir,
            config_path,
            db_path,
        }
    }

    pub fn db(&self) -> Connection {
        let conn = Connection::open(&self.db_path).expect("open test db");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// Runs a command against this env's config; returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_env(args, &[])
    }

    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path());
        cmd.env_remove("SCHEMATIC_API_KEY").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run schematic-sync")
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(&self.config_path, &[])
    }

    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.config_path, env)
    }

    /// One column of a query, as text.
    pub fn query_strings(&self, sql: &str) -> Vec<String> {
        let conn = self.db();
        let mut stmt = conn.prepare(sql).expect("prepare");
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db()
            .query_row(sql, [], |r| r.get(0))
            .expect("count query")
    }
}

/// `schematic-sync serve` as a child process. Its stderr (the log) is read on
/// a thread and kept, so tests can look for lines and the pipe never fills.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("SCHEMATIC_API_KEY")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn schematic-sync serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                        .collect();
                    let _ = addr_tx.send(addr);
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let logs = logs.lock().expect("log lock").join("\n");
                panic!("daemon did not start listening within 30 s; log:\n{logs}");
            }
        };
        Daemon { child, addr, logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for daemon")
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

/// A blocking HTTP client with a short timeout.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Sends `key` as the HTTP Basic user, as Segment's libraries send a write key.
pub fn basic(
    req: reqwest::blocking::RequestBuilder,
    key: &str,
) -> reqwest::blocking::RequestBuilder {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    req.header("Authorization", format!("Basic {token}"))
}

/// POSTs `body` as JSON with `key` in Basic auth; returns the status and the
/// JSON answer (`Null` when the answer is not JSON).
pub fn post_json_as(
    client: &reqwest::blocking::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = basic(client.post(url), key)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

/// Polls `f` until it returns true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
