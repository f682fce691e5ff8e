//! Log setup: human-readable text by default, JSON with `log.format = "json"`,
//! level from `RUST_LOG` or `log.level`. Logs go to stderr so that command
//! output on stdout stays clean for scripts.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; `default_level` applies when neither
/// `RUST_LOG` nor the config says otherwise.
pub fn init(config: &LogConfig, default_level: Option<&str>) {
    let level = default_level.unwrap_or(&config.level);
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},hyper=warn,reqwest=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests running several commands) is harmless
    let _ = match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
