//! Configuration: the `config.toml` keys of SPEC section 9, with their defaults
//! next to them. Every section denies unknown keys, so a typo stops the start
//! with the key and the line instead of being silently ignored.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::mapping::MappingConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub schematic: SchematicConfig,
    pub delivery: DeliveryConfig,
    pub audiences: AudiencesConfig,
    pub log: LogConfig,
    /// `[[mappings]]`: when present they replace the two presets.
    pub mappings: Option<Vec<MappingConfig>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite file, created on first start.
    pub path: PathBuf,
    /// `off`, `normal`, `full` or `extra`.
    pub synchronous: Synchronous,
    /// Ingest answers 503 once the database file is larger than this.
    pub max_size: ByteSize,
    /// Delivered rows and their events older than this are deleted.
    pub retention: HumanDuration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("schematic-sync.db"),
            synchronous: Synchronous::Full,
            max_size: ByteSize(10 * 1024 * 1024 * 1024),
            retention: HumanDuration(Duration::from_secs(7 * 86_400)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

impl Synchronous {
    /// The value `PRAGMA synchronous` reads back as.
    pub fn pragma_value(self) -> i64 {
        match self {
            Synchronous::Off => 0,
            Synchronous::Normal => 1,
            Synchronous::Full => 2,
            Synchronous::Extra => 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Accepted write keys; empty accepts any key (loopback only).
    pub write_keys: Vec<String>,
    pub max_message_size: ByteSize,
    pub max_request_size: ByteSize,
    pub max_batch_messages: usize,
    pub shutdown_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            write_keys: Vec::new(),
            max_message_size: ByteSize(32 * 1024),
            max_request_size: ByteSize(512 * 1024),
            max_batch_messages: 2500,
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchematicConfig {
    pub capture_url: String,
    /// Environment variable holding the API key.
    pub api_key_env: String,
    /// Fallback API key when the environment variable is unset.
    pub api_key: Option<String>,
    /// Events per request, at most 100.
    pub batch_size: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub max_requests_per_second: Option<f64>,
    pub timeout: HumanDuration,
}

impl Default for SchematicConfig {
    fn default() -> Self {
        Self {
            capture_url: "https://c.schematichq.com".to_string(),
            api_key_env: "SCHEMATIC_API_KEY".to_string(),
            api_key: None,
            batch_size: 100,
            concurrency: 4,
            max_requests_per_second: None,
            timeout: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl SchematicConfig {
    /// The API key: the environment variable first, then `api_key`.
    pub fn resolve_api_key(&self) -> Option<String> {
        std::env::var(&self.api_key_env)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .or_else(|| self.api_key.clone().filter(|k| !k.trim().is_empty()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub schedule: Schedule,
    pub backoff_base: HumanDuration,
    pub backoff_max: HumanDuration,
    pub retry_window: HumanDuration,
    pub max_attempts: Option<u32>,
    pub lease: HumanDuration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            schedule: Schedule::parse("*/5 * * * * *").expect("the default schedule is valid"),
            backoff_base: HumanDuration(Duration::from_secs(1)),
            backoff_max: HumanDuration(Duration::from_secs(300)),
            retry_window: HumanDuration(Duration::from_secs(4 * 3600)),
            max_attempts: None,
            lease: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudiencesConfig {
    pub schedule: Schedule,
    /// Key name under which the user id is sent in identify `keys`.
    pub user_key: String,
}

impl Default for AudiencesConfig {
    fn default() -> Self {
        Self {
            schedule: Schedule::parse("0 0 */2 * * *").expect("the default schedule is valid"),
            user_key: "userId".to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Reads and validates a config file. Errors name the file, the key and
    /// the line.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Parses config text and checks the rules serde cannot express.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}", with_mapping_line(text, &e.to_string())))?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let s = &self.schematic;
        if s.batch_size == 0 || s.batch_size > 100 {
            anyhow::bail!(
                "schematic.batch_size must be between 1 and 100 (Schematic refuses larger batches), found {}",
                s.batch_size
            );
        }
        if s.concurrency == 0 {
            anyhow::bail!("schematic.concurrency must be at least 1");
        }
        if let Some(rps) = s.max_requests_per_second {
            if rps.is_nan() || rps <= 0.0 {
                anyhow::bail!("schematic.max_requests_per_second must be positive, found {rps}");
            }
        }
        if !(s.capture_url.starts_with("http://") || s.capture_url.starts_with("https://")) {
            anyhow::bail!(
                "schematic.capture_url must start with http:// or https://, found {:?}",
                s.capture_url
            );
        }
        if self.server.max_batch_messages == 0 {
            anyhow::bail!("server.max_batch_messages must be at least 1");
        }
        if self.server.max_message_size.0 > self.server.max_request_size.0 {
            anyhow::bail!("server.max_message_size must not exceed server.max_request_size");
        }
        if self.server.write_keys.iter().any(|k| k.is_empty()) {
            anyhow::bail!("server.write_keys must not contain an empty key");
        }
        if self.delivery.max_attempts == Some(0) {
            anyhow::bail!("delivery.max_attempts must be at least 1 when set");
        }
        if self.delivery.backoff_base.0 > self.delivery.backoff_max.0 {
            anyhow::bail!("delivery.backoff_base must not exceed delivery.backoff_max");
        }
        if self.audiences.user_key.trim().is_empty() {
            anyhow::bail!("audiences.user_key must not be empty");
        }
        self.compiled_mappings()?;
        Ok(())
    }

    /// `[[mappings]]` compiled, or the two presets when there are none.
    pub fn compiled_mappings(&self) -> anyhow::Result<Vec<crate::mapping::Mapping>> {
        match &self.mappings {
            Some(configs) => {
                crate::mapping::compile(configs).map_err(|e| anyhow::anyhow!("[[mappings]]: {e}"))
            }
            None => Ok(crate::mapping::presets()),
        }
    }

    /// Checked when the HTTP server starts: an open write-key list is only
    /// allowed on a loopback address.
    pub fn check_listen(&self) -> anyhow::Result<()> {
        if self.server.write_keys.is_empty() && !self.server.listen.ip().is_loopback() {
            anyhow::bail!(
                "server.write_keys is empty, which accepts any write key; that is only allowed when \
                 server.listen is a loopback address, but it is {}. List the accepted keys in \
                 server.write_keys or listen on 127.0.0.1",
                self.server.listen
            );
        }
        Ok(())
    }
}

/// Mapping errors name the mapping (`mapping "X": ...`); this adds the line
/// of its `name = "X"` so the user finds it in a long file.
fn with_mapping_line(text: &str, error: &str) -> String {
    let Some(name) = error
        .split_once("mapping \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name)
    else {
        return error.to_string();
    };
    let quoted = format!("{name:?}");
    let line = text.lines().position(|l| {
        let l = l.trim_start();
        l.starts_with("name") && l.contains(&quoted)
    });
    match line {
        Some(n) => format!("{error} (line {})", n + 1),
        None => error.to_string(),
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `4h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit such as 500ms, 30s, 5m, 4h, 7d"))?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unit must be one of ms, s, m, h, d"
                ))
            }
        };
        n.checked_mul(ms)
            .map(|ms| HumanDuration(Duration::from_millis(ms)))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size written as `512KiB`, `10GiB`, `1MB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number and a unit such as 512KiB or 10GiB")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unit must be one of B, KiB, MiB, GiB, TiB, KB, MB, GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A cron expression with a seconds field, checked when the config loads.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub source: String,
    pub cron: cron::Schedule,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let fields = s.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err(format!(
                "invalid schedule {s:?}: expected a cron expression with a seconds field \
                 (6 or 7 fields, e.g. \"*/5 * * * * *\"), found {fields} fields"
            ));
        }
        cron::Schedule::from_str(s)
            .map(|cron| Schedule {
                source: s.to_string(),
                cron,
            })
            .map_err(|e| format!("invalid schedule {s:?}: {e}"))
    }

    /// Time until the next firing after `now`.
    pub fn next_after(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.after(&now).next()
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Schedule::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_every_unit() {
        for (text, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("4h", 14_400_000),
            ("7d", 604_800_000),
        ] {
            assert_eq!(
                text.parse::<HumanDuration>().unwrap().0,
                Duration::from_millis(ms),
                "{text}"
            );
        }
        assert!("4 hours".parse::<HumanDuration>().is_err());
        assert!("h".parse::<HumanDuration>().is_err());
        assert_eq!(HumanDuration(Duration::from_secs(14_400)).to_string(), "4h");
    }

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().0, 512 * 1024);
        assert_eq!("10GiB".parse::<ByteSize>().unwrap().0, 10 << 30);
        assert_eq!("1MB".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert!("10 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn empty_config_gives_spec_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.store.path, PathBuf::from("schematic-sync.db"));
        assert_eq!(c.store.synchronous, Synchronous::Full);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.server.max_batch_messages, 2500);
        assert_eq!(c.schematic.batch_size, 100);
        assert_eq!(c.delivery.retry_window.0, Duration::from_secs(4 * 3600));
        assert_eq!(c.audiences.schedule.source, "0 0 */2 * * *");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it_and_the_line() {
        let err = Config::parse("[store]\npath = \"x.db\"\nretension = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retension"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_reason() {
        let err = Config::parse("[delivery]\nbackoff_base = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration"), "{err}");
        let err = Config::parse("[delivery]\nschedule = \"* * * * *\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("seconds field"), "{err}");
        let err = Config::parse("[schematic]\nbatch_size = 101\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn a_bad_trigger_names_the_mapping_its_line_and_position() {
        let text = "[log]\nlevel = \"info\"\n\n[[mappings]]\nname = \"Bad One\"\ntrigger = 'type = = \"track\"'\naction = \"track\"\n[mappings.fields]\nevent_name = \"$.event\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(
            err.contains("Bad One") && err.contains("position") && err.contains("line 5"),
            "{err}"
        );
    }

    #[test]
    fn open_write_keys_need_loopback() {
        let c = Config::parse("[server]\nlisten = \"0.0.0.0:8787\"\n").unwrap();
        assert!(c
            .check_listen()
            .unwrap_err()
            .to_string()
            .contains("loopback"));
        let c =
            Config::parse("[server]\nlisten = \"0.0.0.0:8787\"\nwrite_keys = [\"k\"]\n").unwrap();
        assert!(c.check_listen().is_ok());
    }
}
